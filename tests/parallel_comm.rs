//! Every collective of the CPU communicators: in-process threads (2 and 4 ranks, sub-groups)
//! and TCP between threads and between processes on 127.0.0.1, plus the failure modes
//! (shape mismatch, a rank that never arrives, a rank that died).

mod parallel_common;

use candle_core::{DType, Device, Shape, Tensor};
use mbridge::parallel::comm::{Communicator, LocalWorld, ReduceOp, TcpOptions, TcpWorld};
use mbridge::parallel::{GroupKind, RankOrder, Topology};
use parallel_common::{run_ranks, try_ranks};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(120);

/// Rank `r`'s test tensor `[4, 6]`: distinct, non-trivial floats.
fn input(r: usize) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37 - 3.1) * (r as f32 + 1.3)).collect();
    Tensor::from_vec(v, (4, 6), &Device::Cpu)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// Runs every collective on `g` and checks the results exactly (sums are added in group-rank
/// order, so the expected values are bit-exact). `ranks` maps group rank → input index.
fn battery(g: &dyn Communicator, ranks: &[usize]) -> anyhow::Result<Vec<u32>> {
    let (me, n) = (g.rank(), g.size());
    assert_eq!(n, ranks.len());
    let mine = input(ranks[me])?;
    let all: Vec<Tensor> = ranks.iter().map(|&r| input(r)).collect::<Result<_, _>>()?;
    let mut want = all[0].clone();
    for t in &all[1..] {
        want = (want + t)?;
    }
    let sum = g.all_reduce(&mine, ReduceOp::Sum)?;
    assert_eq!(bits(&sum), bits(&want), "all_reduce sum on group rank {me}");
    let mut want_max = all[0].clone();
    for t in &all[1..] {
        want_max = want_max.maximum(t)?;
    }
    assert_eq!(bits(&g.all_reduce(&mine, ReduceOp::Max)?), bits(&want_max));
    for dim in [0, 1] {
        let got = g.all_gather(&mine, dim)?;
        assert_eq!(bits(&got), bits(&Tensor::cat(&all, dim)?), "all_gather dim {dim}");
    }
    if 4 % n == 0 {
        let c = 4 / n;
        let got = g.reduce_scatter(&mine, 0)?;
        assert_eq!(bits(&got), bits(&want.narrow(0, me * c, c)?), "reduce_scatter");
    }
    let got = g.broadcast(&mine, n - 1)?;
    assert_eq!(bits(&got), bits(&all[n - 1]), "broadcast");
    // Ring: send to the next rank, receive from the previous one.
    let (next, prev) = ((me + 1) % n, (me + n - 1) % n);
    g.send(&mine, next)?;
    let got = g.recv(prev, &Shape::from((4, 6)), DType::F32, &Device::Cpu)?;
    assert_eq!(bits(&got), bits(&all[prev]), "recv from {prev}");
    // Other dtypes travel exactly too.
    let b = mine.to_dtype(DType::BF16)?;
    let got = g.all_gather(&b, 0)?.to_dtype(DType::F32)?;
    let want_b: Vec<Tensor> = all
        .iter()
        .map(|t| t.to_dtype(DType::BF16)?.to_dtype(DType::F32))
        .collect::<Result<_, _>>()?;
    assert_eq!(bits(&got), bits(&Tensor::cat(&want_b, 0)?));
    let ids = Tensor::new(&[me as i64, -7], &Device::Cpu)?;
    let got = g.all_gather(&ids, 0)?.to_vec1::<i64>()?;
    let want_ids: Vec<i64> = (0..n as i64).flat_map(|r| [r, -7]).collect();
    assert_eq!(got, want_ids);
    let r = Tensor::new(&[3.25f64, -1.0], &Device::Cpu)?;
    let got = g.all_reduce(&r, ReduceOp::Sum)?.to_vec1::<f64>()?;
    assert_eq!(got, vec![3.25 * n as f64, -(n as f64)]);
    g.barrier()?;
    Ok(bits(&sum))
}

#[test]
fn collectives_on_2_and_4_threads() {
    for n in [2, 4] {
        let sums = run_ranks(n, DEADLINE, move |rank, world| {
            let g = world.world_group(rank)?;
            let ranks: Vec<usize> = (0..n).collect();
            battery(&g, &ranks)
        });
        // Every rank holds bit-identical results.
        assert!(sums.windows(2).all(|w| w[0] == w[1]));
    }
}

/// Sub-groups of a 2×2 (tp × dp) grid used interleaved: each group only sees its members.
#[test]
fn subgroups_of_a_grid() {
    let topo = Topology::new(4, 2, 1, 1, RankOrder::TpCpDpPp).unwrap();
    run_ranks(4, DEADLINE, move |rank, world| {
        let tp_members = topo.group_of(GroupKind::Tp, rank).unwrap();
        let dp_members = topo.group_of(GroupKind::Dp, rank).unwrap();
        let tp = world.group(rank, "tp", &tp_members)?;
        let dp = world.group(rank, "dp", &dp_members)?;
        for _ in 0..3 {
            battery(&tp, &tp_members)?;
            battery(&dp, &dp_members)?;
        }
        Ok(())
    });
}

#[test]
fn mismatched_shapes_name_the_ranks() {
    let out = try_ranks(2, DEADLINE, |rank, world| {
        let g = world.world_group(rank)?;
        let t = Tensor::zeros(2 + rank, DType::F32, &Device::Cpu)?;
        Ok(g.all_reduce(&t, ReduceOp::Sum)?)
    });
    for (rank, r) in out.iter().enumerate() {
        let err = r.as_ref().unwrap_err();
        assert!(err.contains(&format!("rank {rank} (world group [0, 1]) in all_reduce")), "{err}");
        assert!(err.contains("[2]") && err.contains("[3]"), "{err}");
    }
    let out = try_ranks(2, DEADLINE, |rank, world| {
        let g = world.world_group(rank)?;
        if rank == 0 {
            g.send(&Tensor::zeros(3, DType::F32, &Device::Cpu)?, 1)?;
            Ok(())
        } else {
            g.recv(0, &Shape::from(4), DType::F32, &Device::Cpu).map(|_| ()).map_err(Into::into)
        }
    });
    let err = out[1].as_ref().unwrap_err();
    assert!(err.contains("rank 0 sent F32 [3], expected F32 [4]"), "{err}");
}

#[test]
fn a_missing_rank_times_out_and_a_dead_rank_fails_fast() {
    let world = LocalWorld::new(3, Duration::from_millis(300));
    let g = world.world_group(0).unwrap();
    let t0 = Instant::now();
    let err = g.barrier().unwrap_err().to_string();
    assert!(err.contains("timed out") && err.contains("waiting for rank 1"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let world = LocalWorld::new(2, Duration::from_secs(600));
    world.abort_rank(1, "worker exited: out of memory");
    let g = world.world_group(0).unwrap();
    let t0 = Instant::now();
    let err = g.all_reduce(&input(0).unwrap(), ReduceOp::Sum).unwrap_err().to_string();
    assert!(err.contains("rank 1 is gone (worker exited: out of memory)"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(world.group(0, "x", &[0, 5]).is_err());
    assert!(world.group(0, "x", &[1]).unwrap_err().to_string().contains("not a member"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tcp_opts(rank: usize, world_size: usize, port: u16, timeout: Duration) -> TcpOptions {
    TcpOptions { rank, world_size, master_addr: "127.0.0.1".into(), master_port: port, timeout }
}

#[test]
fn tcp_between_threads() {
    let port = free_port();
    let sums = run_ranks(3, DEADLINE, move |rank, _| {
        let w = TcpWorld::connect(&tcp_opts(rank, 3, port, Duration::from_secs(60)))?;
        let g = w.world_group()?;
        let s = battery(&g, &[0, 1, 2])?;
        // A sub-group of ranks 0 and 2 (rank 1 stays out).
        if rank != 1 {
            let sub = w.group("pair", &[2, 0])?;
            battery(&sub, &[2, 0])?;
        }
        g.barrier()?;
        Ok(s)
    });
    assert!(sums.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn tcp_tells_a_finished_peer_from_a_failed_one() {
    // Rank 1 says goodbye before leaving, rank 2 just leaves: only rank 2 counts as failed
    // (what the NCCL watchdog stops on), and a receive from either names how it left.
    let port = free_port();
    let out = run_ranks(3, DEADLINE, move |rank, _| {
        let w = TcpWorld::connect(&tcp_opts(rank, 3, port, Duration::from_secs(60)))?;
        let g = w.world_group()?;
        g.barrier()?;
        if rank == 1 {
            w.farewell();
        }
        if rank != 0 {
            return Ok(String::new());
        }
        let recv_err = |src| {
            g.recv(src, &candle_core::Shape::from(1), DType::F32, &Device::Cpu)
                .unwrap_err()
                .to_string()
        };
        let (from_1, from_2) = (recv_err(1), recv_err(2));
        let failed = w.failed_peers();
        assert_eq!(failed.iter().map(|(r, _)| *r).collect::<Vec<_>>(), vec![2], "{failed:?}");
        Ok(format!("{from_1}\n{from_2}"))
    });
    let (from_1, from_2) = out[0].split_once('\n').unwrap();
    assert!(from_1.contains("rank 1 is gone (finished its run; connection closed"), "{from_1}");
    assert!(from_2.contains("rank 2 is gone (connection closed"), "{from_2}");
}

#[test]
fn tcp_rendezvous_names_the_rank_that_did_not_arrive() {
    let port = free_port();
    let out = try_ranks(2, DEADLINE, move |rank, _| {
        Ok(TcpWorld::connect(&tcp_opts(rank, 3, port, Duration::from_millis(1500))).map(|_| ())?)
    });
    for r in &out {
        let err = r.as_ref().unwrap_err();
        assert!(err.contains("rank(s) [2] of 3 did not arrive"), "{err}");
    }
    // Nobody at the master: a clear error after the timeout.
    let err = TcpWorld::connect(&tcp_opts(1, 2, free_port(), Duration::from_millis(500)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("could not reach the rendezvous master"), "{err}");
}

/// Child half of [`tcp_between_processes`]: does nothing unless started by it.
#[test]
fn tcp_child_rank() {
    let Ok(rank) = std::env::var("MBRIDGE_TEST_TCP_RANK") else { return };
    let rank: usize = rank.parse().unwrap();
    let port: u16 = std::env::var("MASTER_PORT").unwrap().parse().unwrap();
    let w = TcpWorld::connect(&tcp_opts(rank, 2, port, Duration::from_secs(60))).unwrap();
    let g = w.world_group().unwrap();
    battery(&g, &[0, 1]).unwrap();
    g.barrier().unwrap();
    println!("tcp child rank {rank} done");
}

#[test]
fn tcp_between_processes() {
    let port = free_port().to_string();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..2)
        .map(|rank| {
            std::process::Command::new(&exe)
                .args(["--exact", "tcp_child_rank", "--nocapture", "--test-threads=1"])
                .env("MBRIDGE_TEST_TCP_RANK", rank.to_string())
                .env("MASTER_PORT", &port)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let end = Instant::now() + DEADLINE;
    let mut codes = [None; 2];
    while codes.iter().any(Option::is_none) {
        for (i, c) in children.iter_mut().enumerate() {
            if codes[i].is_none() {
                codes[i] = c.try_wait().unwrap();
            }
        }
        if Instant::now() > end {
            children.iter_mut().for_each(|c| {
                let _ = c.kill();
            });
            panic!("TCP child processes did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            codes[i].unwrap().success(),
            "rank {i} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("tcp child rank {i} done")), "rank {i}: {stdout}");
    }
}

/// Every group of a TP=2 × PP=2 grid over TCP from a launcher environment; the groups talk
/// among their members only.
#[test]
fn process_groups_over_tcp_from_env() {
    use mbridge::parallel::launch::discover;
    use mbridge::parallel::ProcessGroups;
    let port = free_port().to_string();
    let results = run_ranks(4, DEADLINE, move |rank, _| {
        let env: std::collections::HashMap<String, String> = [
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", "4".to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let d = discover(&env)?;
        let topo = Topology::new(4, 2, 1, 2, RankOrder::TpCpDpPp)?;
        let g = ProcessGroups::connect_tcp(&d, topo, Duration::from_secs(60))?;
        let l = g.layout();
        let one = Tensor::new(&[rank as f32], &Device::Cpu)?;
        let tp_sum = g.tp.all_reduce(&one, ReduceOp::Sum)?.to_vec1::<f32>()?[0];
        let pp_sum = g.pp.all_reduce(&one, ReduceOp::Sum)?.to_vec1::<f32>()?[0];
        let world_sum = g.world.all_reduce(&one, ReduceOp::Sum)?.to_vec1::<f32>()?[0];
        let embd = g.embedding.as_ref().map(|e| e.size());
        Ok((l.tp_rank, l.pp_rank, tp_sum, pp_sum, world_sum, g.dp.size(), embd))
    });
    // rank = tp + 2·pp: tp groups {0,1},{2,3}; pp groups {0,2},{1,3}.
    assert_eq!(results[0], (0, 0, 1.0, 2.0, 6.0, 1, Some(2)));
    assert_eq!(results[3], (1, 1, 5.0, 4.0, 6.0, 1, Some(2)));
}

/// The library's thread runner returns results in rank order and names the failing rank;
/// the failure reaches the peers at once instead of after the timeout.
#[test]
fn local_world_run_reports_the_failing_rank() {
    let sums = LocalWorld::run(3, Duration::from_secs(60), |rank, world| {
        let g = world.world_group(rank)?;
        let t = Tensor::new(&[rank as f32], &Device::Cpu)?;
        Ok(g.all_reduce(&t, ReduceOp::Sum)?.to_vec1::<f32>()?[0])
    })
    .unwrap();
    assert_eq!(sums, vec![3.0; 3]);
    let t0 = Instant::now();
    let err = LocalWorld::run(3, Duration::from_secs(600), |rank, world| {
        let g = world.world_group(rank)?;
        if rank == 1 {
            anyhow::bail!("bad shard file");
        }
        g.barrier()?;
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 0 of 3 failed") && err.contains("rank 1 is gone"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(30));
}
