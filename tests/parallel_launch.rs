//! Rank discovery from torchrun, SLURM and OpenMPI environments, and `mbridge env`.

use assert_cmd::Command;
use mbridge::parallel::launch::{
    discover, expand_nodelist, expand_tasks_per_node, Launcher, DEFAULT_MASTER_PORT,
};
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn torchrun_variables() {
    let d = discover(&env(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("GROUP_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.5"),
        ("MASTER_PORT", "12345"),
        // torchrun inside a SLURM allocation: torchrun's variables win.
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
    ]))
    .unwrap();
    assert_eq!(d.launcher, Launcher::Torchrun);
    assert_eq!((d.rank, d.world_size, d.local_rank, d.local_world_size), (3, 8, 1, 2));
    assert_eq!((d.node_rank, d.master_addr.as_str(), d.master_port), (Some(1), "10.0.0.5", 12345));
    let err = discover(&env(&[("RANK", "0")])).unwrap_err().to_string();
    assert!(err.contains("WORLD_SIZE"), "{err}");
    let err = discover(&env(&[("RANK", "4"), ("WORLD_SIZE", "4")])).unwrap_err().to_string();
    assert!(err.contains("rank 4 out of range"), "{err}");
    let err = discover(&env(&[("RANK", "x"), ("WORLD_SIZE", "4")])).unwrap_err().to_string();
    assert!(err.contains("RANK=\"x\""), "{err}");
    let err = discover(&env(&[("MASTER_PORT", "70000")])).unwrap_err().to_string();
    assert!(err.contains("MASTER_PORT"), "{err}");
}

#[test]
fn slurm_variables() {
    let base = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "7"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "3"),
        ("SLURM_JOB_NODELIST", "node[01-03,07]"),
        ("SLURM_TASKS_PER_NODE", "2(x3),1"),
    ];
    let d = discover(&env(&base)).unwrap();
    assert_eq!(d.launcher, Launcher::Slurm);
    assert_eq!((d.rank, d.world_size, d.local_rank, d.local_world_size), (5, 7, 0, 1));
    assert_eq!((d.node_rank, d.master_addr.as_str()), (Some(3), "node01"));
    assert_eq!(d.master_port, DEFAULT_MASTER_PORT);
    let mut e = env(&base);
    e.insert("MASTER_ADDR".into(), "head".into());
    e.insert("SLURM_NODEID".into(), "0".into());
    e.insert("SLURM_PROCID".into(), "1".into());
    e.insert("SLURM_LOCALID".into(), "1".into());
    let d = discover(&e).unwrap();
    assert_eq!((d.master_addr.as_str(), d.local_world_size), ("head", 2));
    let mut e = env(&base);
    e.remove("SLURM_JOB_NODELIST");
    let err = discover(&e).unwrap_err().to_string();
    assert!(err.contains("SLURM_JOB_NODELIST"), "{err}");
    let mut e = env(&base);
    e.insert("SLURM_JOB_NODELIST".into(), "node[01-".into());
    assert!(discover(&e).is_err());
}

#[test]
fn nodelists_and_task_counts() {
    let n = |s: &str| expand_nodelist(s).unwrap();
    assert_eq!(n("node[01-03,07]"), ["node01", "node02", "node03", "node07"]);
    assert_eq!(n("gpu5"), ["gpu5"]);
    assert_eq!(n("a[1-2],b,c[009-010]"), ["a1", "a2", "b", "c009", "c010"]);
    assert_eq!(n("r[1-2]n[3-4]"), ["r1n3", "r1n4", "r2n3", "r2n4"]);
    assert_eq!(n("dgx-[1-2]-ib"), ["dgx-1-ib", "dgx-2-ib"]);
    for bad in ["node[3-1]", "node[a-b]", "node]", "node[[1]]", "", "a,,b"] {
        assert!(expand_nodelist(bad).is_err(), "{bad}");
    }
    assert_eq!(expand_tasks_per_node("2(x3),1").unwrap(), [2, 2, 2, 1]);
    assert_eq!(expand_tasks_per_node("4").unwrap(), [4]);
    assert!(expand_tasks_per_node("2(x").is_err());
}

#[test]
fn openmpi_and_single_process() {
    let d = discover(&env(&[
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
    ]))
    .unwrap();
    assert_eq!(d.launcher, Launcher::OpenMpi);
    assert_eq!(
        (d.rank, d.world_size, d.local_rank, d.master_addr.as_str()),
        (2, 4, 2, "127.0.0.1")
    );
    let err = discover(&env(&[
        ("OMPI_COMM_WORLD_RANK", "2"),
        ("OMPI_COMM_WORLD_SIZE", "4"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(err.contains("MASTER_ADDR"), "{err}");
    let d = discover(&HashMap::new()).unwrap();
    assert_eq!((d.launcher, d.rank, d.world_size), (Launcher::Single, 0, 1));
}

#[test]
fn env_subcommand_prints_rank_and_groups() {
    let out = Command::cargo_bin("mbridge")
        .unwrap()
        .args(["env", "--tp", "2", "--pp", "2"])
        .env_clear()
        .env("SLURM_PROCID", "5")
        .env("SLURM_NTASKS", "8")
        .env("SLURM_LOCALID", "1")
        .env("SLURM_NODEID", "2")
        .env("SLURM_JOB_NODELIST", "gpu[07-10]")
        .env("SLURM_TASKS_PER_NODE", "2(x4)")
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .success();
    let text = String::from_utf8(out.get_output().stdout.clone()).unwrap();
    for want in [
        "launcher: slurm",
        "rank: 5",
        "world_size: 8",
        "master_addr: gpu07",
        "coords: tp=1 cp=0 dp=0 pp=1",
        "tp group: [4, 5]",
        "pp group: [1, 5]",
        "dp group: [5, 7]",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    Command::cargo_bin("mbridge")
        .unwrap()
        .args(["env", "--tp", "3"])
        .env_clear()
        .env("RANK", "0")
        .env("WORLD_SIZE", "4")
        .timeout(std::time::Duration::from_secs(60))
        .assert()
        .failure()
        .stderr(predicates::str::contains("not divisible"));
}
