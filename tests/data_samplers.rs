//! Sample order of the `cyclic` and `batch` loaders equals Megatron Bridge's samplers
//! (fixture: scripts/fixtures/data_samplers.py runs them), and torch.randperm is reproduced.

use mbridge::data::sampler::torch_rng::randperm;
use mbridge::data::sampler::{GlobalBatchOptions, GlobalBatchSampler, RandomSampler};
use serde_json::Value;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/data/samplers.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn u(v: &Value, k: &str) -> usize {
    v[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize
}

#[test]
fn randperm_matches_torch() {
    let f = fixture();
    for case in f["randperm"].as_array().unwrap() {
        let expected: Vec<usize> =
            case["perm"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        let got = randperm(u(case, "n"), case["seed"].as_u64().unwrap()).unwrap();
        assert_eq!(got, expected, "n={} seed={}", case["n"], case["seed"]);
    }
    assert!(randperm(usize::MAX / 2, 0).is_err(), "torch's 64-bit path must be refused");
}

#[test]
fn cyclic_sampler_matches_megatron_bridge() {
    let f = fixture();
    for case in f["random"].as_array().unwrap() {
        let mut s = RandomSampler::new(
            u(case, "total"),
            u(case, "consumed"),
            u(case, "mbs"),
            u(case, "rank"),
            u(case, "dp"),
            case["sharding"].as_bool().unwrap(),
        )
        .unwrap();
        for (i, want) in case["batches"].as_array().unwrap().iter().enumerate() {
            let want: Vec<usize> =
                want.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            assert_eq!(s.next_micro().unwrap(), want, "case {case:?} micro-batch {i}");
        }
    }
}

#[test]
fn batch_sampler_matches_megatron_bridge() {
    let f = fixture();
    for case in f["batch"].as_array().unwrap() {
        let (mbs, gbs, dp) = (u(case, "mbs"), u(case, "gbs"), u(case, "dp"));
        let opts = GlobalBatchOptions {
            drop_last: case["drop_last"].as_bool().unwrap(),
            shuffle: case["shuffle"].as_bool().unwrap(),
            seed: case["seed"].as_u64().unwrap(),
        };
        let mut s = GlobalBatchSampler::new(
            u(case, "total"),
            u(case, "consumed"),
            mbs,
            gbs,
            u(case, "rank"),
            dp,
            opts,
        )
        .unwrap();
        for (i, want) in case["global_batches"].as_array().unwrap().iter().enumerate() {
            // Python yields the rank's whole share (-1 = padding); we yield it micro-batch-wise.
            let want: Vec<Option<usize>> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().filter(|&x| x >= 0).map(|x| x as usize))
                .collect();
            let got: Vec<Option<usize>> =
                (0..gbs / (mbs * dp)).flat_map(|_| s.next_micro().unwrap()).collect();
            assert_eq!(got, want, "case {case:?} global batch {i}");
        }
    }
}

#[test]
fn resume_continues_the_same_order() {
    // Drawing k micro-batches then rebuilding from the consumed count gives the same stream.
    let mut a = GlobalBatchSampler::new(
        30,
        0,
        2,
        8,
        1,
        2,
        GlobalBatchOptions { drop_last: true, shuffle: true, seed: 5 },
    )
    .unwrap();
    let first: Vec<_> = (0..20).map(|_| a.next_micro().unwrap()).collect();
    let mut b = GlobalBatchSampler::new(
        30,
        5 * 8,
        2,
        8,
        1,
        2,
        GlobalBatchOptions { drop_last: true, shuffle: true, seed: 5 },
    )
    .unwrap();
    let resumed: Vec<_> = (0..10).map(|_| b.next_micro().unwrap()).collect();
    assert_eq!(&first[10..], &resumed[..]);
    let mut c = RandomSampler::new(30, 0, 3, 0, 2, true).unwrap();
    let first: Vec<_> = (0..12).map(|_| c.next_micro().unwrap()).collect();
    let mut d = RandomSampler::new(30, 6 * 6, 3, 0, 2, true).unwrap();
    let resumed: Vec<_> = (0..6).map(|_| d.next_micro().unwrap()).collect();
    assert_eq!(&first[6..], &resumed[..]);
}
