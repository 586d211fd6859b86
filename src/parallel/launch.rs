//! Rank discovery from the launcher's environment: torchrun, SLURM (`srun`) and OpenMPI
//! (`mpirun`), or a single process when none is present.
//!
//! [`discover`] is a pure function of an environment map, so every launcher is testable;
//! [`discover_from_process_env`] reads the real environment. Precedence: torchrun's
//! variables (`RANK` + `WORLD_SIZE`, also what `mbridge --nproc-per-node` sets) win, then
//! SLURM, then OpenMPI. `MASTER_ADDR`/`MASTER_PORT` override the derived master everywhere.
//!
//! ```
//! use mbridge::parallel::launch::{discover, Launcher};
//! use std::collections::HashMap;
//! let env: HashMap<String, String> = [
//!     ("SLURM_PROCID", "5"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", "1"),
//!     ("SLURM_NODEID", "2"), ("SLURM_JOB_NODELIST", "gpu[07-10]"),
//!     ("SLURM_TASKS_PER_NODE", "2(x4)"),
//! ].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
//! let d = discover(&env).unwrap();
//! assert_eq!(d.launcher, Launcher::Slurm);
//! assert_eq!((d.rank, d.world_size, d.local_rank, d.local_world_size), (5, 8, 1, 2));
//! assert_eq!(d.master_addr, "gpu07");
//! ```

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;

/// torchrun's default rendezvous port, used when `MASTER_PORT` is not set.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher started this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun / `mbridge --nproc-per-node` (`RANK`, `WORLD_SIZE`, ...).
    Torchrun,
    /// SLURM `srun` (`SLURM_PROCID`, `SLURM_NTASKS`, ...).
    Slurm,
    /// OpenMPI `mpirun` (`OMPI_COMM_WORLD_*`).
    OpenMpi,
    /// No launcher variables: one process.
    Single,
}

impl Launcher {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Torchrun => "torchrun",
            Self::Slurm => "slurm",
            Self::OpenMpi => "openmpi",
            Self::Single => "single",
        }
    }
}

/// What the environment says about this process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// The launcher the variables came from.
    pub launcher: Launcher,
    /// Global rank.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// Rank on this node (selects the GPU).
    pub local_rank: usize,
    /// Processes on this node.
    pub local_world_size: usize,
    /// Index of this node, when the launcher says.
    pub node_rank: Option<usize>,
    /// Host of global rank 0.
    pub master_addr: String,
    /// Rendezvous port.
    pub master_port: u16,
}

fn get<'a>(env: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    env.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
}

fn num(env: &HashMap<String, String>, key: &str) -> Result<Option<usize>> {
    get(env, key)
        .map(|v| {
            v.parse::<usize>().map_err(|_| anyhow!("{key}={v:?} is not a non-negative integer"))
        })
        .transpose()
}

fn need(env: &HashMap<String, String>, key: &str, launcher: &str) -> Result<usize> {
    num(env, key)?.ok_or_else(|| anyhow!("{launcher} environment: {key} is not set"))
}

/// Reads this process's environment (see [`discover`]).
pub fn discover_from_process_env() -> Result<DistEnv> {
    discover(&std::env::vars().collect())
}

/// Rank, world size, local rank and master address from launcher variables in `env`.
pub fn discover(env: &HashMap<String, String>) -> Result<DistEnv> {
    let master_port = match get(env, "MASTER_PORT") {
        Some(p) => {
            p.parse::<u16>().map_err(|_| anyhow!("MASTER_PORT={p:?} is not a port number"))?
        }
        None => DEFAULT_MASTER_PORT,
    };
    let master_env = get(env, "MASTER_ADDR").map(str::to_string);
    let d = if get(env, "RANK").is_some() || get(env, "WORLD_SIZE").is_some() {
        let world_size = need(env, "WORLD_SIZE", "torchrun")?;
        DistEnv {
            launcher: Launcher::Torchrun,
            rank: need(env, "RANK", "torchrun")?,
            world_size,
            local_rank: num(env, "LOCAL_RANK")?.unwrap_or(0),
            local_world_size: num(env, "LOCAL_WORLD_SIZE")?.unwrap_or(world_size),
            node_rank: num(env, "GROUP_RANK")?.or(num(env, "NODE_RANK")?),
            master_addr: master_env.unwrap_or_else(|| "127.0.0.1".to_string()),
            master_port,
        }
    } else if get(env, "SLURM_PROCID").is_some() && get(env, "SLURM_NTASKS").is_some() {
        slurm(env, master_env, master_port)?
    } else if get(env, "OMPI_COMM_WORLD_RANK").is_some() {
        let world_size = need(env, "OMPI_COMM_WORLD_SIZE", "OpenMPI")?;
        let local_world_size = num(env, "OMPI_COMM_WORLD_LOCAL_SIZE")?.unwrap_or(world_size);
        let master_addr = match master_env {
            Some(a) => a,
            None if local_world_size == world_size => "127.0.0.1".to_string(),
            None => bail!(
                "OpenMPI job over several nodes: set MASTER_ADDR to the host of rank 0 (e.g. mpirun -x MASTER_ADDR=...)"
            ),
        };
        DistEnv {
            launcher: Launcher::OpenMpi,
            rank: need(env, "OMPI_COMM_WORLD_RANK", "OpenMPI")?,
            world_size,
            local_rank: num(env, "OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0),
            local_world_size,
            node_rank: num(env, "OMPI_COMM_WORLD_NODE_RANK")?,
            master_addr,
            master_port,
        }
    } else {
        DistEnv {
            launcher: Launcher::Single,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            node_rank: None,
            master_addr: master_env.unwrap_or_else(|| "127.0.0.1".to_string()),
            master_port,
        }
    };
    let name = d.launcher.name();
    if d.world_size == 0 || d.rank >= d.world_size {
        bail!("{name} environment: rank {} out of range for world size {}", d.rank, d.world_size);
    }
    if d.local_world_size == 0 || d.local_rank >= d.local_world_size {
        bail!(
            "{name} environment: local rank {} out of range for local world size {}",
            d.local_rank,
            d.local_world_size
        );
    }
    Ok(d)
}

fn slurm(env: &HashMap<String, String>, master: Option<String>, port: u16) -> Result<DistEnv> {
    let world_size = need(env, "SLURM_NTASKS", "SLURM")?;
    let node_rank = num(env, "SLURM_NODEID")?;
    let nodelist = get(env, "SLURM_JOB_NODELIST").or(get(env, "SLURM_NODELIST"));
    let master_addr = match (master, nodelist) {
        (Some(a), _) => a,
        (None, Some(list)) => expand_nodelist(list)
            .with_context(|| format!("SLURM_JOB_NODELIST={list:?}"))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("SLURM_JOB_NODELIST is empty"))?,
        (None, None) => {
            bail!("SLURM environment: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
        }
    };
    let per_node = match get(env, "SLURM_TASKS_PER_NODE").or(get(env, "SLURM_STEP_TASKS_PER_NODE"))
    {
        Some(spec) => {
            let counts = expand_tasks_per_node(spec)
                .with_context(|| format!("SLURM_TASKS_PER_NODE={spec:?}"))?;
            counts.get(node_rank.unwrap_or(0)).copied()
        }
        None => None,
    };
    let local_world_size = match per_node {
        Some(n) => n,
        None => num(env, "SLURM_NTASKS_PER_NODE")?.unwrap_or(world_size),
    };
    Ok(DistEnv {
        launcher: Launcher::Slurm,
        rank: need(env, "SLURM_PROCID", "SLURM")?,
        world_size,
        local_rank: num(env, "SLURM_LOCALID")?.unwrap_or(0),
        local_world_size,
        node_rank,
        master_addr,
        master_port: port,
    })
}

/// Splits at commas that are not inside brackets.
fn split_top(s: &str) -> Result<Vec<&str>> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            bail!("unbalanced or nested brackets");
        }
    }
    if depth != 0 {
        bail!("unbalanced brackets");
    }
    out.push(&s[start..]);
    Ok(out)
}

/// Expands a SLURM hostlist (`node[01-03,07],login1`, several bracket groups allowed, e.g.
/// `r[1-2]n[1-2]`), keeping zero padding, in SLURM's order.
pub fn expand_nodelist(list: &str) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    for item in split_top(list.trim())? {
        if item.is_empty() {
            bail!("empty host name");
        }
        let mut names = vec![String::new()];
        let mut rest = item;
        while let Some(open) = rest.find('[') {
            let close = rest.find(']').ok_or_else(|| anyhow!("missing ']'"))?;
            let prefix = &rest[..open];
            let mut values = Vec::new();
            for range in rest[open + 1..close].split(',') {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let width = a.len();
                let lo: u64 = a.parse().map_err(|_| anyhow!("bad range {range:?}"))?;
                let hi: u64 = b.parse().map_err(|_| anyhow!("bad range {range:?}"))?;
                if hi < lo || hi - lo > 100_000 {
                    bail!("bad range {range:?}");
                }
                values.extend((lo..=hi).map(|v| format!("{v:0width$}")));
            }
            names = names
                .iter()
                .flat_map(|n| values.iter().map(move |v| format!("{n}{prefix}{v}")))
                .collect();
            rest = &rest[close + 1..];
        }
        hosts.extend(names.into_iter().map(|n| n + rest));
    }
    Ok(hosts)
}

/// Expands `SLURM_TASKS_PER_NODE` (`2(x3),1`) into one count per node.
pub fn expand_tasks_per_node(spec: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (n, reps) = match part.split_once("(x") {
            Some((n, r)) => (n, r.strip_suffix(')').ok_or_else(|| anyhow!("bad entry {part:?}"))?),
            None => (part, "1"),
        };
        let n: usize = n.parse().map_err(|_| anyhow!("bad entry {part:?}"))?;
        let reps: usize = reps.parse().map_err(|_| anyhow!("bad entry {part:?}"))?;
        out.extend(std::iter::repeat_n(n, reps));
    }
    Ok(out)
}
