//! Where a pipeline rank exchanges tensors with its neighbours between the passes of its
//! schedule, so that the exchanges cannot deadlock when a send only completes once the
//! receiver has posted the matching receive (NCCL's point-to-point semantics on one stream).
//!
//! As megatron-core's 1F1B loop does (`send_forward_recv_backward`,
//! `send_backward_recv_forward`, `send_forward_recv_forward`), the sends a pass produces are
//! issued together with the receive the next pass needs, as one group (`ncclGroupStart/End`,
//! `batch_isend_irecv`): every transfer of a group progresses at once. Within a group
//! activations come before gradients, on both ends, so two ranks that exchange both kinds on
//! one channel (PP=2 with virtual stages) match them in the same order. The interleaved
//! schedule follows megatron-core's placement (`recv_tensor_from_previous_stage`).
//! [`tests::plans_never_deadlock`] replays every rank's plan under those semantics.

use anyhow::Result;

use super::schedule::{interleaved_table, schedule, Op, ScheduleSpec};

/// What a transfer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Payload {
    /// A chunk's output activation, forward direction.
    Activation,
    /// The gradient of a chunk's input activation, backward direction.
    Grad,
}

/// One tensor sent to or received from a neighbouring pipeline rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    pub payload: Payload,
    /// The other pipeline rank.
    pub peer: usize,
    /// This rank's model chunk that produced (send) or consumes (receive) the tensor.
    pub chunk: usize,
    /// Micro-batch the tensor belongs to.
    pub microbatch: usize,
}

/// One step of a rank's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Sends and receives issued as one group (never both empty).
    Exchange { sends: Vec<Transfer>, recvs: Vec<Transfer> },
    /// A forward or backward pass.
    Run(Op),
}

/// The receive `op` needs before it can run and the send it produces, on pipeline rank
/// `rank` of `pp` with `vp` chunks per rank: chunk `c` of rank `r` is virtual stage
/// `c·pp + r`, so only the very first stage has no input and the very last no output.
fn transfers(op: Op, rank: usize, pp: usize, vp: usize) -> (Option<Transfer>, Option<Transfer>) {
    let (next, prev) = ((rank + 1) % pp, (rank + pp - 1) % pp);
    let first = |chunk: usize| rank == 0 && chunk == 0;
    let last = |chunk: usize| rank == pp - 1 && chunk == vp - 1;
    match op {
        Op::Forward { chunk, microbatch } => {
            let t = |peer| Transfer { payload: Payload::Activation, peer, chunk, microbatch };
            ((!first(chunk)).then(|| t(prev)), (!last(chunk)).then(|| t(next)))
        }
        Op::Backward { chunk, microbatch } => {
            let t = |peer| Transfer { payload: Payload::Grad, peer, chunk, microbatch };
            ((!last(chunk)).then(|| t(next)), (!first(chunk)).then(|| t(prev)))
        }
    }
}

/// Rank `spec.pp_rank`'s passes (as [`schedule`]) with the exchanges between them: each pass
/// is preceded by one group holding the previous pass's send and its own receive, and the
/// last pass is followed by its send. PP=1 gives the passes alone.
pub fn plan(spec: &ScheduleSpec) -> Result<Vec<Step>> {
    if spec.num_chunks > 1 {
        return interleaved_plan(spec);
    }
    let ops = schedule(spec)?;
    let (pp, vp) = (spec.pp_size, spec.num_chunks);
    let mut steps = Vec::with_capacity(ops.len() * 2 + 1);
    let mut pending_send: Option<Transfer> = None;
    let push_exchange = |steps: &mut Vec<Step>, send: Option<Transfer>, recv: Option<Transfer>| {
        let sends: Vec<Transfer> = send.into_iter().collect();
        let recvs: Vec<Transfer> = recv.into_iter().collect();
        if !sends.is_empty() || !recvs.is_empty() {
            steps.push(Step::Exchange { sends, recvs });
        }
    };
    for op in ops {
        let (recv, send) = if pp > 1 { transfers(op, spec.pp_rank, pp, vp) } else { (None, None) };
        push_exchange(&mut steps, pending_send.take(), recv);
        steps.push(Step::Run(op));
        pending_send = send;
    }
    push_exchange(&mut steps, pending_send, None);
    Ok(steps)
}

fn exchange(sends: Vec<Transfer>, mut recvs: Vec<Transfer>) -> Option<Step> {
    recvs.sort_by_key(|t| t.payload);
    (!sends.is_empty() || !recvs.is_empty()).then_some(Step::Exchange { sends, recvs })
}

/// megatron-core's `forward_backward_pipelining_with_interleaving` (without p2p overlap):
/// each warm-up forward is followed by `send_forward_recv_forward`, each steady forward +
/// backward pair by `send_forward_backward_recv_forward_backward`, each cool-down backward by
/// `send_backward_recv_backward`. Receives are for a later pass, not necessarily the next:
/// the first stage runs `pp − 1` virtual micro-batches ahead of the last, so what it receives
/// is what the last stage sends in the same step. Evaluation (forward only) is the warm-up
/// loop over every virtual micro-batch.
fn interleaved_plan(spec: &ScheduleSpec) -> Result<Vec<Step>> {
    let (table, warmup) = interleaved_table(spec)?;
    let ops = schedule(spec)?;
    let (pp, rank, vp) = (spec.pp_size, spec.pp_rank, spec.num_chunks);
    let total = table.len();
    let remaining = total - warmup;
    let (first_rank, last_rank) = (rank == 0, rank == pp - 1);
    let (next, prev) = ((rank + 1) % pp, (rank + pp - 1) % pp);
    // Virtual micro-batch k → forward chunk / backward chunk (Python-style negative k wraps).
    let fwd_chunk = |k: isize| table[k.rem_euclid(total as isize) as usize].1;
    let bwd_chunk = |k: isize| vp - 1 - fwd_chunk(k);
    // Which micro-batch each chunk's next received tensor is for: the order its passes run.
    let mut act_for: Vec<std::collections::VecDeque<usize>> = vec![Default::default(); vp];
    let mut grad_for = act_for.clone();
    for op in &ops {
        match *op {
            Op::Forward { chunk, microbatch } => act_for[chunk].push_back(microbatch),
            Op::Backward { chunk, microbatch } => grad_for[chunk].push_back(microbatch),
        }
    }
    // Chunk 0 of rank 0 embeds: it never receives activations and the last chunk of the last
    // rank never receives gradients (it computes the loss).
    if first_rank {
        act_for[0].clear();
    }
    if last_rank {
        grad_for[vp - 1].clear();
    }
    let mut recv = |payload: Payload, chunk: usize| -> Result<Transfer> {
        let (queue, peer) = match payload {
            Payload::Activation => (&mut act_for[chunk], prev),
            Payload::Grad => (&mut grad_for[chunk], next),
        };
        let microbatch = queue.pop_front().ok_or_else(|| {
            anyhow::anyhow!("interleaved plan: no {payload:?} left to receive for chunk {chunk}")
        })?;
        Ok(Transfer { payload, peer, chunk, microbatch })
    };
    // megatron-core's `recv_tensor_from_previous_stage(k, forward)`: after virtual
    // micro-batch k, does a tensor arrive, and for which chunk? The leading stage (first rank
    // forward, last rank backward) runs pp − 1 virtual micro-batches ahead of the ending
    // stage, so it receives what the other end produced for k − (pp − 1).
    let incoming = |k: usize, forward: bool| -> (bool, usize) {
        let chunk_of = |v: isize| if forward { fwd_chunk(v) } else { bwd_chunk(v) };
        let leading = if forward { first_rank } else { last_rank };
        if !leading {
            return (true, chunk_of(k as isize + 1));
        }
        let (mut recv, chunk) = if k < pp - 1 {
            (false, chunk_of(k as isize + 1))
        } else {
            (true, chunk_of(k as isize - (pp as isize - 1)))
        };
        let end_chunk = if forward { vp - 1 } else { 0 };
        if chunk == end_chunk {
            recv = false;
        }
        (recv, if forward { chunk + 1 } else { chunk.wrapping_sub(1) })
    };
    let send_of = |op: Op| transfers(op, rank, pp, vp).1;
    let (forwards, backwards): (Vec<Op>, Vec<Op>) =
        ops.iter().copied().partition(|o| matches!(o, Op::Forward { .. }));
    let fwd_op = |k: usize| forwards.get(k).copied();
    let bwd_op = |k: usize| backwards.get(k).copied();
    let mut steps = Vec::with_capacity(ops.len() * 2 + 2);
    if !first_rank {
        steps.extend(exchange(vec![], vec![recv(Payload::Activation, fwd_chunk(0))?]));
    }
    for k in 0..warmup {
        let op = fwd_op(k).expect("warm-up forward");
        steps.push(Step::Run(op));
        let (recv_prev, chunk) = incoming(k, true);
        let mut recvs = Vec::new();
        if recv_prev && k != total - 1 {
            recvs.push(recv(Payload::Activation, chunk)?);
        }
        if k == warmup - 1 && remaining > 0 && !last_rank && !spec.forward_only {
            recvs.push(recv(Payload::Grad, vp - 1)?);
        }
        steps.extend(exchange(send_of(op).into_iter().collect(), recvs));
    }
    for k in 0..remaining {
        let fk = k + warmup;
        let (f, b) = (fwd_op(fk).expect("steady forward"), bwd_op(k).expect("steady backward"));
        steps.push(Step::Run(f));
        steps.push(Step::Run(b));
        let mut recvs = Vec::new();
        let (recv_prev, fwd_chunk_in) = incoming(fk, true);
        if recv_prev && k != remaining - 1 {
            recvs.push(recv(Payload::Activation, fwd_chunk_in)?);
        }
        let (recv_next, bwd_chunk_in) = incoming(k, false);
        if recv_next {
            recvs.push(recv(Payload::Grad, bwd_chunk_in)?);
        }
        steps.extend(exchange(send_of(f).into_iter().chain(send_of(b)).collect(), recvs));
    }
    if spec.forward_only {
        return Ok(steps);
    }
    if remaining == 0 && !last_rank {
        steps.extend(exchange(vec![], vec![recv(Payload::Grad, vp - 1)?]));
    }
    for k in remaining..total {
        let op = bwd_op(k).expect("cool-down backward");
        steps.push(Step::Run(op));
        let (recv_next, chunk) = incoming(k, false);
        let mut recvs = Vec::new();
        if recv_next && k != total - 1 {
            recvs.push(recv(Payload::Grad, chunk)?);
        }
        steps.extend(exchange(send_of(op).into_iter().collect(), recvs));
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Replays every rank's plan with rendezvous semantics: a rank works through its steps in
    /// order; a transfer completes only while both ends sit in the group that holds it, the
    /// k-th send on a channel (src → dst) meeting the k-th receive there. Fails on a
    /// deadlock or on a receive that would get a tensor of another kind or micro-batch.
    fn replay(pp: usize, vp: usize, m: usize, group: usize) -> Result<(), String> {
        replay_plans(&plans(pp, vp, m, group, false)?)?;
        // Evaluation walks the same table forwards only.
        replay_plans(&plans(pp, vp, m, group, true)?)
    }

    fn plans(
        pp: usize,
        vp: usize,
        m: usize,
        group: usize,
        forward_only: bool,
    ) -> Result<Vec<Vec<Step>>, String> {
        (0..pp)
            .map(|pp_rank| {
                plan(&ScheduleSpec {
                    pp_size: pp,
                    pp_rank,
                    num_microbatches: m,
                    num_chunks: vp,
                    microbatch_group_size: group,
                    forward_only,
                })
                .map_err(|e| format!("rank {pp_rank}: {e}"))
            })
            .collect()
    }

    fn replay_plans(plans: &[Vec<Step>]) -> Result<(), String> {
        let pp = plans.len();
        // (rank, step, index in group) of each transfer → its position on its channel.
        let mut seq: HashMap<(usize, usize, bool, usize), usize> = HashMap::new();
        let mut counts: HashMap<(usize, usize, bool), usize> = HashMap::new();
        for (rank, steps) in plans.iter().enumerate() {
            for (s, step) in steps.iter().enumerate() {
                if let Step::Exchange { sends, recvs } = step {
                    for (i, t) in sends.iter().enumerate() {
                        let n = counts.entry((rank, t.peer, true)).or_default();
                        seq.insert((rank, s, true, i), *n);
                        *n += 1;
                    }
                    for (i, t) in recvs.iter().enumerate() {
                        let n = counts.entry((t.peer, rank, false)).or_default();
                        seq.insert((rank, s, false, i), *n);
                        *n += 1;
                    }
                }
            }
        }
        let mut at = vec![0usize; pp];
        let mut done: std::collections::HashSet<(usize, usize, bool, usize)> = Default::default();
        loop {
            let mut progress = false;
            for rank in 0..pp {
                while let Some(Step::Run(_)) = plans[rank].get(at[rank]) {
                    at[rank] += 1;
                    progress = true;
                }
                let Some(Step::Exchange { sends, .. }) = plans[rank].get(at[rank]) else {
                    continue;
                };
                // Match this rank's sends with receives in the peer's current group.
                for (i, t) in sends.iter().enumerate() {
                    let key = (rank, at[rank], true, i);
                    if done.contains(&key) {
                        continue;
                    }
                    let k = seq[&key];
                    let Some(Step::Exchange { recvs, .. }) = plans[t.peer].get(at[t.peer]) else {
                        continue;
                    };
                    for (j, r) in recvs.iter().enumerate() {
                        let rkey = (t.peer, at[t.peer], false, j);
                        if r.peer == rank && seq[&rkey] == k {
                            // The chunk the tensor reaches: the next virtual stage for an
                            // activation, the previous one for a gradient (wrapping a rank).
                            let chunk = match t.payload {
                                Payload::Activation => t.chunk + usize::from(t.peer < rank),
                                Payload::Grad => t.chunk.wrapping_sub(usize::from(t.peer > rank)),
                            };
                            if (r.payload, r.microbatch, r.chunk)
                                != (t.payload, t.microbatch, chunk)
                            {
                                return Err(format!(
                                    "rank {} receives {:?} of micro-batch {} for chunk {} where \
                                     rank {rank} sent {:?} of micro-batch {} for chunk {chunk}",
                                    t.peer,
                                    r.payload,
                                    r.microbatch,
                                    r.chunk,
                                    t.payload,
                                    t.microbatch
                                ));
                            }
                            done.insert(key);
                            done.insert(rkey);
                            progress = true;
                        }
                    }
                }
            }
            for rank in 0..pp {
                if let Some(Step::Exchange { sends, recvs }) = plans[rank].get(at[rank]) {
                    let all = (0..sends.len()).all(|i| done.contains(&(rank, at[rank], true, i)))
                        && (0..recvs.len()).all(|i| done.contains(&(rank, at[rank], false, i)));
                    if all {
                        at[rank] += 1;
                        progress = true;
                    }
                }
            }
            if (0..pp).all(|r| at[r] == plans[r].len()) {
                return Ok(());
            }
            if !progress {
                let stuck: Vec<String> =
                    (0..pp).map(|r| format!("rank {r} at {:?}", plans[r].get(at[r]))).collect();
                return Err(format!("deadlock: {}", stuck.join("; ")));
            }
        }
    }

    #[test]
    fn plans_never_deadlock() {
        for pp in 1..=8 {
            for m in 1..=12 {
                replay(pp, 1, m, pp).unwrap_or_else(|e| panic!("pp {pp} m {m}: {e}"));
            }
        }
        for pp in 2..=6 {
            for vp in 2..=4 {
                for m in pp..=3 * pp {
                    for group in pp..=m {
                        let tail = m % group;
                        if tail > 0 && tail < pp {
                            continue; // refused by the schedule
                        }
                        replay(pp, vp, m, group)
                            .unwrap_or_else(|e| panic!("pp {pp} vp {vp} m {m} group {group}: {e}"));
                    }
                }
            }
        }
    }

    #[test]
    fn ungrouped_transfers_deadlock_in_the_replay() {
        // The replay must be able to fail: issuing each transfer on its own, sends first (what
        // the engine did before), deadlocks 1F1B already at PP=2 once a send of the next
        // activation meets the neighbour's send of the previous gradient.
        let split = |steps: Vec<Step>| -> Vec<Step> {
            steps
                .into_iter()
                .flat_map(|s| match s {
                    Step::Exchange { sends, recvs } => sends
                        .into_iter()
                        .map(|t| Step::Exchange { sends: vec![t], recvs: vec![] })
                        .chain(
                            recvs
                                .into_iter()
                                .map(|t| Step::Exchange { sends: vec![], recvs: vec![t] }),
                        )
                        .collect::<Vec<_>>(),
                    run => vec![run],
                })
                .collect()
        };
        let ungrouped: Vec<Vec<Step>> =
            plans(2, 1, 4, 2, false).unwrap().into_iter().map(split).collect();
        let err = replay_plans(&ungrouped).unwrap_err();
        assert!(err.starts_with("deadlock"), "{err}");
        assert!(replay(2, 1, 4, 2).is_ok());
    }

    #[test]
    fn one_f_one_b_groups_as_megatron() {
        // Middle rank of PP=3, 4 micro-batches: warm-up forward, then forward with
        // send_forward_recv_backward, backward with send_backward_recv_forward.
        let steps = plan(&ScheduleSpec {
            pp_size: 3,
            pp_rank: 1,
            num_microbatches: 4,
            num_chunks: 1,
            microbatch_group_size: 3,
            forward_only: false,
        })
        .unwrap();
        let t = |payload, peer, microbatch| Transfer { payload, peer, chunk: 0, microbatch };
        let (act, grad) = (Payload::Activation, Payload::Grad);
        assert_eq!(steps[0], Step::Exchange { sends: vec![], recvs: vec![t(act, 0, 0)] });
        assert_eq!(steps[1], Step::Run(Op::Forward { chunk: 0, microbatch: 0 }));
        assert_eq!(
            steps[2],
            Step::Exchange { sends: vec![t(act, 2, 0)], recvs: vec![t(act, 0, 1)] }
        );
        assert_eq!(steps[3], Step::Run(Op::Forward { chunk: 0, microbatch: 1 }));
        assert_eq!(
            steps[4],
            Step::Exchange { sends: vec![t(act, 2, 1)], recvs: vec![t(grad, 2, 0)] }
        );
        assert_eq!(steps[5], Step::Run(Op::Backward { chunk: 0, microbatch: 0 }));
        assert_eq!(
            steps[6],
            Step::Exchange { sends: vec![t(grad, 0, 0)], recvs: vec![t(act, 0, 2)] }
        );
        assert_eq!(
            steps.last(),
            Some(&Step::Exchange { sends: vec![t(grad, 0, 3)], recvs: vec![] })
        );
    }
}
