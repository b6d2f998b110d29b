//! The ordering rules of cluster changes: from what the operator observes (the spec, the pods,
//! the Raft members) to the single next step that is safe to take. Pure, so each rule is tested
//! without a cluster; the reconciler observes, asks for one step, takes it and looks again.
//!
//! Member `id` = pod ordinal + 1, so pod `<name>-k` is always member `k + 1`.

/// How far (in log entries) a member may trail the leader's commit index and still count as
/// caught up: a learner is promoted, and a restarted member is trusted, only within this.
pub const CATCH_UP_LAG: u64 = 500;

/// A member pod as the operator sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodView {
    pub ordinal: i32,
    /// Scheduled, started and not being deleted.
    pub running: bool,
    pub ready: bool,
    pub terminating: bool,
    /// The raftkv version the pod runs (its `raftkv.io/version` annotation).
    pub version: Option<String>,
}

/// A Raft member as the cluster reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    pub id: u64,
    pub learner: bool,
    /// The member's applied index, when it answered the operator.
    pub applied: Option<u64>,
    /// The volume behind the member is not the one it was created on: its data is gone.
    pub volume_replaced: bool,
}

impl MemberView {
    pub fn ordinal(&self) -> i32 {
        ordinal_of(self.id)
    }
}

pub fn ordinal_of(id: u64) -> i32 {
    i32::try_from(id).map_or(i32::MAX, |i| i - 1)
}

pub fn id_of(ordinal: i32) -> u64 {
    u64::try_from(ordinal).map_or(0, |o| o + 1)
}

/// The Raft side: present when some member answered and a leader is known.
#[derive(Clone, Debug, PartialEq)]
pub struct RaftView {
    pub members: Vec<MemberView>,
    pub leader: u64,
    /// The leader's commit index.
    pub commit: u64,
}

impl RaftView {
    fn member(&self, id: u64) -> Option<&MemberView> {
        self.members.iter().find(|m| m.id == id)
    }

    fn voters(&self) -> impl Iterator<Item = &MemberView> {
        self.members.iter().filter(|m| !m.learner)
    }

    /// Within [`CATCH_UP_LAG`] of the leader's commit: what "healthy" means everywhere.
    pub fn caught_up(&self, m: &MemberView) -> bool {
        m.applied
            .is_some_and(|a| a.saturating_add(CATCH_UP_LAG) >= self.commit)
    }

    fn healthy_voters_except(&self, id: u64) -> usize {
        self.voters()
            .filter(|m| m.id != id && self.caught_up(m))
            .count()
    }

    /// A majority of the voters is caught up: the cluster can commit.
    pub fn has_healthy_quorum(&self) -> bool {
        let voters = self.voters().count();
        self.voters().filter(|m| self.caught_up(m)).count() > voters / 2
    }

    fn all_voters_healthy(&self) -> bool {
        self.voters().all(|m| self.caught_up(m))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// `spec.replicas`.
    pub replicas: i32,
    /// `spec.version`.
    pub version: String,
    /// The StatefulSet's replicas, if it exists.
    pub pods_wanted: Option<i32>,
    pub pods: Vec<PodView>,
    /// None when no member answered or none knows a leader.
    pub raft: Option<RaftView>,
    /// The cluster has formed once; from then on members join it one at a time.
    pub bootstrapped: bool,
}

impl Observed {
    fn pod(&self, ordinal: i32) -> Option<&PodView> {
        self.pods.iter().find(|p| p.ordinal == ordinal)
    }
}

/// Why a member leaves the Raft group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Removal {
    ScaleDown,
    /// Its volume was lost; it comes back as a fresh learner.
    Replace,
    /// A learner nobody asked for (beyond `replicas`).
    StrayLearner,
}

/// The next thing to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Set the StatefulSet to this many pods.
    SetPods(i32),
    /// Add the pod with this ordinal to Raft as a learner.
    AddLearner(i32),
    /// Make this caught-up learner a voter.
    Promote(u64),
    RemoveMember(u64, Removal),
    /// Hand leadership to `to` before `from` is removed or restarted.
    MoveLeader {
        from: u64,
        to: u64,
    },
    /// Delete this pod so the StatefulSet recreates it at the new version.
    RestartPod(i32),
    /// The initial members formed the cluster.
    MarkBootstrapped,
    /// A change is under way; look again shortly.
    Wait(String),
    /// The spec asks for something unsafe; nothing is touched.
    Refuse(String),
    /// The cluster cannot be changed safely now (no quorum, members down).
    Degraded(String),
    /// Everything matches the spec.
    Converged,
}

/// Checks a spec before anything is touched (the CRD schema already rejects most of this; the
/// operator does not rely on it).
pub fn validate(replicas: i32) -> Result<(), String> {
    if !(1..=9).contains(&replicas) {
        return Err(format!(
            "replicas is {replicas}: a cluster has 1 to 9 members"
        ));
    }
    if replicas % 2 == 0 {
        return Err(format!(
            "replicas is {replicas}: an even member count tolerates no more failures than {} and \
             makes a split vote possible; use an odd count",
            replicas - 1
        ));
    }
    Ok(())
}

pub fn plan(o: &Observed) -> Step {
    if let Err(e) = validate(o.replicas) {
        return Step::Refuse(e);
    }
    if !o.bootstrapped {
        return plan_formation(o);
    }
    let Some(r) = &o.raft else {
        return Step::Degraded(
            "no member reports a leader: quorum is lost or members are unreachable; membership \
             is left unchanged"
                .into(),
        );
    };

    // A member whose volume was replaced lost its log and its vote: it must leave and rejoin as
    // a learner before it can count towards a quorum again.
    if let Some(m) = r.members.iter().find(|m| m.volume_replaced) {
        return remove_safely(r, m, Removal::Replace);
    }
    if let Some(m) = r
        .members
        .iter()
        .filter(|m| m.learner && m.ordinal() >= o.replicas)
        .max_by_key(|m| m.id)
    {
        return Step::RemoveMember(m.id, Removal::StrayLearner);
    }
    // Pods of members already removed go first, one at a time.
    let highest_member = r.members.iter().map(|m| m.ordinal()).max().unwrap_or(-1);
    let pods_needed = o.replicas.max(highest_member + 1);
    if let Some(current) = o.pods_wanted
        && current > pods_needed
    {
        return Step::SetPods((current - 1).max(pods_needed));
    }
    // Scale down: highest ordinal first.
    if let Some(m) = r
        .voters()
        .filter(|m| m.ordinal() >= o.replicas)
        .max_by_key(|m| m.id)
    {
        return remove_safely(r, m, Removal::ScaleDown);
    }

    // A learner becomes a voter before anyone else joins.
    if let Some(m) = r.members.iter().find(|m| m.learner) {
        return if r.caught_up(m) {
            Step::Promote(m.id)
        } else {
            Step::Wait(format!(
                "learner {} is catching up (applied {:?}, commit {})",
                m.id, m.applied, r.commit
            ))
        };
    }
    // Scale up (and re-adding replaced members): the lowest missing ordinal first.
    if let Some(ordinal) = (0..o.replicas).find(|k| r.member(id_of(*k)).is_none()) {
        if o.pods_wanted.unwrap_or(0) <= ordinal {
            return Step::SetPods(ordinal + 1);
        }
        if !r.all_voters_healthy() {
            return Step::Degraded(format!(
                "not adding member {}: wait until every voting member is caught up",
                id_of(ordinal)
            ));
        }
        return match o.pod(ordinal) {
            Some(p) if p.running => Step::AddLearner(ordinal),
            _ => Step::Wait(format!("waiting for pod ordinal {ordinal} to start")),
        };
    }
    if o.pods_wanted.unwrap_or(0) < o.replicas {
        return Step::SetPods(o.replicas);
    }

    if let Some(m) = r.voters().find(|m| !r.caught_up(m)) {
        if o.pod(m.ordinal()).is_none_or(|p| !p.ready) {
            return Step::Wait(format!("waiting for member {} to start and catch up", m.id));
        }
        return Step::Degraded(format!(
            "member {} is not caught up with the leader (applied {:?}, commit {})",
            m.id, m.applied, r.commit
        ));
    }
    plan_upgrade(o, r)
}

fn plan_formation(o: &Observed) -> Step {
    if o.pods_wanted != Some(o.replicas) {
        return Step::SetPods(o.replicas);
    }
    match &o.raft {
        Some(r) if r.voters().count() == o.replicas as usize && r.all_voters_healthy() => {
            Step::MarkBootstrapped
        }
        _ => Step::Wait(format!(
            "waiting for the {} initial members to form the cluster",
            o.replicas
        )),
    }
}

/// Removes `m`, first moving leadership away from it, and only if the voters left still hold a
/// quorum of healthy members.
fn remove_safely(r: &RaftView, m: &MemberView, why: Removal) -> Step {
    if !m.learner {
        let voters_after = r.voters().count().saturating_sub(1);
        let healthy_after = r.healthy_voters_except(m.id);
        if voters_after == 0 || healthy_after < voters_after / 2 + 1 {
            return Step::Degraded(format!(
                "removing member {} would leave {healthy_after} healthy of {voters_after} voters: \
                 no quorum; waiting",
                m.id
            ));
        }
        if r.leader == m.id {
            return match best_successor(r, m.id, |_| true) {
                Some(to) => Step::MoveLeader { from: m.id, to },
                None => Step::Degraded(format!(
                    "member {} leads and no other voter is caught up to take over",
                    m.id
                )),
            };
        }
    }
    Step::RemoveMember(m.id, why)
}

/// The healthy voter (other than `from`, and passing `ok`) with the most applied entries.
fn best_successor(r: &RaftView, from: u64, ok: impl Fn(&MemberView) -> bool) -> Option<u64> {
    r.voters()
        .filter(|v| v.id != from && r.caught_up(v) && ok(v))
        .max_by_key(|v| (v.applied, std::cmp::Reverse(v.id)))
        .map(|v| v.id)
}

/// Rolling upgrade: one pod at a time, followers (highest ordinal first) before the leader,
/// whose leadership moves to an upgraded member first; each step only when every member is
/// up, ready and caught up.
fn plan_upgrade(o: &Observed, r: &RaftView) -> Step {
    let outdated = |p: &PodView| p.version.as_deref() != Some(o.version.as_str());
    let mut pending: Vec<&PodView> = o
        .pods
        .iter()
        .filter(|p| p.ordinal < o.replicas && outdated(p))
        .collect();
    if let Some(p) = o
        .pods
        .iter()
        .find(|p| p.ordinal < o.replicas && (p.terminating || !p.running || !p.ready))
    {
        return Step::Wait(format!(
            "waiting for pod ordinal {} to be running and ready",
            p.ordinal
        ));
    }
    if (0..o.replicas).any(|k| o.pod(k).is_none()) {
        return Step::Wait("waiting for every member pod to exist".into());
    }
    if pending.is_empty() {
        return Step::Converged;
    }
    pending.sort_by_key(|p| std::cmp::Reverse(p.ordinal));
    let leader_ordinal = ordinal_of(r.leader);
    if let Some(p) = pending.iter().find(|p| p.ordinal != leader_ordinal) {
        return Step::RestartPod(p.ordinal);
    }
    // Only the leader is left: move leadership to an upgraded member, then restart it.
    let upgraded = |m: &MemberView| o.pod(m.ordinal()).is_some_and(|p| !outdated(p));
    if o.replicas == 1 {
        return Step::RestartPod(leader_ordinal);
    }
    match best_successor(r, r.leader, upgraded) {
        Some(to) => Step::MoveLeader { from: r.leader, to },
        None => Step::Wait("waiting for an upgraded member to take over leadership".into()),
    }
}

#[cfg(test)]
mod tests;
