//! Ordering tests: a small simulated cluster (pods, volumes, Raft members, a steady writer)
//! driven only by the steps `plan` chooses, checking after every step the invariants the
//! operator promises: one member change at a time, a quorum of caught-up voters always, the
//! leader never removed or restarted while it leads, and convergence to the spec.

use super::*;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
struct SimMember {
    learner: bool,
    applied: u64,
}

#[derive(Clone, Debug)]
struct Sim {
    replicas: i32,
    version: String,
    /// The version new pods get (the StatefulSet template).
    template_version: String,
    pods_wanted: Option<i32>,
    pods: BTreeMap<i32, PodView>,
    members: BTreeMap<u64, SimMember>,
    leader: u64,
    commit: u64,
    bootstrapped: bool,
    /// Ordinals whose volume was swapped for an empty one.
    replaced: Vec<i32>,
    /// A member that does not answer.
    down: Option<u64>,
    steps: Vec<Step>,
}

impl Sim {
    fn running(replicas: i32, version: &str) -> Sim {
        let mut s = Sim {
            replicas,
            version: version.into(),
            template_version: version.into(),
            pods_wanted: Some(replicas),
            pods: BTreeMap::new(),
            members: BTreeMap::new(),
            leader: 1,
            commit: 1000,
            bootstrapped: true,
            replaced: vec![],
            down: None,
            steps: vec![],
        };
        for k in 0..replicas {
            s.pods.insert(k, pod(k, version));
            s.members.insert(
                id_of(k),
                SimMember {
                    learner: false,
                    applied: 1000,
                },
            );
        }
        s
    }

    fn observe(&self) -> Observed {
        Observed {
            replicas: self.replicas,
            version: self.version.clone(),
            pods_wanted: self.pods_wanted,
            pods: self.pods.values().cloned().collect(),
            raft: (!self.members.is_empty()).then(|| RaftView {
                members: self
                    .members
                    .iter()
                    .map(|(id, m)| MemberView {
                        id: *id,
                        learner: m.learner,
                        applied: (self.down != Some(*id)).then_some(m.applied),
                        volume_replaced: self.replaced.contains(&ordinal_of(*id)),
                    })
                    .collect(),
                leader: self.leader,
                commit: self.commit,
            }),
            bootstrapped: self.bootstrapped,
        }
    }

    fn voters(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|(_, m)| !m.learner)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Time passes: pods start, the writer commits, reachable members with a running pod catch
    /// up.
    fn tick(&mut self) {
        self.commit += 10;
        for p in self.pods.values_mut() {
            p.running = true;
            p.terminating = false;
        }
        for (id, m) in self.members.iter_mut() {
            let up = self.down != Some(*id)
                && self.pods.get(&ordinal_of(*id)).is_some_and(|p| p.running);
            if up {
                m.applied = self.commit;
            }
        }
        for p in self.pods.values_mut() {
            p.ready = self.members.contains_key(&id_of(p.ordinal));
        }
    }

    fn apply(&mut self, step: &Step) {
        let voters_before = self.voters().len();
        match step {
            Step::SetPods(n) => {
                self.pods_wanted = Some(*n);
                self.pods.retain(|k, _| k < n);
                for k in 0..*n {
                    let v = self.template_version.clone();
                    self.pods.entry(k).or_insert_with(|| PodView {
                        running: false,
                        ..pod(k, &v)
                    });
                }
            }
            Step::AddLearner(k) => {
                assert!(
                    self.pods[k].running,
                    "added a member whose pod is not running"
                );
                let old = self.members.insert(
                    id_of(*k),
                    SimMember {
                        learner: true,
                        applied: 0,
                    },
                );
                assert!(old.is_none(), "added an existing member");
                self.replaced.retain(|o| o != k);
            }
            Step::Promote(id) => {
                let m = self.members.get_mut(id).expect("promoted a member");
                assert!(m.learner, "promoted a voter");
                assert!(
                    m.applied + CATCH_UP_LAG >= self.commit,
                    "promoted a lagging learner"
                );
                m.learner = false;
            }
            Step::RemoveMember(id, _) => {
                assert_ne!(*id, self.leader, "removed the leader while it leads");
                self.members.remove(id).expect("removed a member");
            }
            Step::MoveLeader { from, to } => {
                assert_eq!(*from, self.leader);
                assert!(
                    self.voters().contains(to),
                    "moved leadership to a non-voter"
                );
                self.leader = *to;
            }
            Step::RestartPod(k) => {
                if self.replicas > 1 {
                    assert_ne!(id_of(*k), self.leader, "restarted the leader's pod");
                }
                let down = self
                    .pods
                    .values()
                    .filter(|p| !p.running || p.terminating)
                    .count();
                assert_eq!(down, 0, "restarted a pod while another is down");
                let v = self.template_version.clone();
                self.pods.insert(
                    *k,
                    PodView {
                        running: false,
                        ready: false,
                        ..pod(*k, &v)
                    },
                );
                if let Some(m) = self.members.get_mut(&id_of(*k)) {
                    m.applied = m.applied.saturating_sub(2000);
                }
            }
            Step::MarkBootstrapped => self.bootstrapped = true,
            Step::Wait(_) | Step::Degraded(_) | Step::Refuse(_) | Step::Converged => {}
        }
        let voters_after = self.voters().len();
        assert!(
            voters_after.abs_diff(voters_before) <= 1,
            "more than one member change at once"
        );
        if !self.members.is_empty() && self.bootstrapped {
            let healthy = self
                .members
                .iter()
                .filter(|(id, m)| !m.learner && self.down != Some(**id))
                .filter(|(id, _)| {
                    self.pods.get(&ordinal_of(**id)).is_some_and(|p| p.running)
                        || matches!(step, Step::RestartPod(_))
                })
                .count();
            assert!(
                healthy > voters_after / 2 || self.down.is_some(),
                "quorum lost after {step:?}: {healthy} of {voters_after}"
            );
        }
        self.steps.push(step.clone());
    }

    /// Runs the planner until it converges (or gives up after `limit` steps).
    fn converge(&mut self, limit: usize) -> Step {
        for _ in 0..limit {
            let step = plan(&self.observe());
            if matches!(step, Step::Converged | Step::Refuse(_) | Step::Degraded(_)) {
                return step;
            }
            self.apply(&step);
            self.tick();
        }
        panic!("no convergence after {limit} steps: {:#?}", self.steps);
    }

    /// The steps taken, without the waits.
    fn actions(&self) -> Vec<Step> {
        self.steps
            .iter()
            .filter(|s| !matches!(s, Step::Wait(_)))
            .cloned()
            .collect()
    }
}

fn pod(ordinal: i32, version: &str) -> PodView {
    PodView {
        ordinal,
        running: true,
        ready: true,
        terminating: false,
        version: Some(version.into()),
    }
}

#[test]
fn a_new_cluster_starts_every_pod_then_is_marked_formed() {
    let mut s = Sim::running(3, "1.0");
    s.bootstrapped = false;
    s.pods_wanted = None;
    s.pods.clear();
    let members = std::mem::take(&mut s.members);
    assert_eq!(plan(&s.observe()), Step::SetPods(3));
    s.apply(&Step::SetPods(3));
    assert!(
        matches!(plan(&s.observe()), Step::Wait(_)),
        "not formed yet"
    );
    s.members = members;
    s.tick();
    assert_eq!(plan(&s.observe()), Step::MarkBootstrapped);
    s.apply(&Step::MarkBootstrapped);
    assert_eq!(s.converge(10), Step::Converged);
}

#[test]
fn scaling_up_adds_one_learner_at_a_time_and_promotes_it_once_caught_up() {
    let mut s = Sim::running(3, "1.0");
    s.replicas = 5;
    assert_eq!(s.converge(40), Step::Converged);
    assert_eq!(
        s.actions(),
        vec![
            Step::SetPods(4),
            Step::AddLearner(3),
            Step::Promote(4),
            Step::SetPods(5),
            Step::AddLearner(4),
            Step::Promote(5),
        ]
    );
    assert_eq!(s.voters(), vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_learner_is_not_promoted_before_it_catches_up() {
    let mut s = Sim::running(3, "1.0");
    s.replicas = 5;
    s.apply(&Step::SetPods(4));
    s.tick();
    s.apply(&Step::AddLearner(3));
    // No tick: the learner has applied nothing yet.
    assert!(matches!(plan(&s.observe()), Step::Wait(w) if w.contains("catching up")));
    s.tick();
    assert_eq!(plan(&s.observe()), Step::Promote(4));
}

#[test]
fn scaling_down_moves_leadership_away_then_removes_the_highest_members_before_their_pods() {
    let mut s = Sim::running(5, "1.0");
    s.leader = 5;
    s.replicas = 3;
    assert_eq!(s.converge(40), Step::Converged);
    let actions = s.actions();
    assert!(
        matches!(actions[0], Step::MoveLeader { from: 5, to } if to <= 4),
        "{actions:?}"
    );
    let rest: Vec<Step> = actions[1..]
        .iter()
        .filter(|s| !matches!(s, Step::MoveLeader { .. }))
        .cloned()
        .collect();
    assert_eq!(
        rest,
        vec![
            Step::RemoveMember(5, Removal::ScaleDown),
            Step::SetPods(4),
            Step::RemoveMember(4, Removal::ScaleDown),
            Step::SetPods(3),
        ]
    );
    assert_eq!(s.voters(), vec![1, 2, 3]);
    assert!(s.leader <= 3);
}

#[test]
fn an_upgrade_restarts_one_follower_at_a_time_and_the_leader_last() {
    let mut s = Sim::running(3, "1.0");
    s.leader = 2;
    s.version = "1.1".into();
    s.template_version = "1.1".into();
    assert_eq!(s.converge(40), Step::Converged);
    let actions = s.actions();
    assert_eq!(actions[0], Step::RestartPod(2));
    assert_eq!(actions[1], Step::RestartPod(0));
    assert!(matches!(actions[2], Step::MoveLeader { from: 2, to } if to != 2));
    assert_eq!(actions[3], Step::RestartPod(1));
    assert_eq!(actions.len(), 4);
    assert!(s.pods.values().all(|p| p.version.as_deref() == Some("1.1")));
}

#[test]
fn an_upgrade_waits_for_the_restarted_member_to_catch_up() {
    let mut s = Sim::running(3, "1.0");
    s.version = "1.1".into();
    s.template_version = "1.1".into();
    assert_eq!(plan(&s.observe()), Step::RestartPod(2));
    s.apply(&Step::RestartPod(2));
    // The pod is back but its member trails the leader: nothing else restarts.
    if let Some(p) = s.pods.get_mut(&2) {
        p.running = true;
        p.ready = true;
    }
    assert!(matches!(plan(&s.observe()), Step::Degraded(d) if d.contains("not caught up")));
    s.tick();
    assert_eq!(plan(&s.observe()), Step::RestartPod(1));
}

#[test]
fn unsafe_specs_are_refused() {
    for replicas in [0, 2, 4, 10, -1] {
        let mut s = Sim::running(3, "1.0");
        s.replicas = replicas;
        assert!(
            matches!(plan(&s.observe()), Step::Refuse(_)),
            "{replicas} replicas accepted"
        );
    }
}

#[test]
fn without_a_leader_nothing_is_changed() {
    let mut s = Sim::running(3, "1.0");
    s.replicas = 5;
    s.members.clear();
    assert!(matches!(plan(&s.observe()), Step::Degraded(d) if d.contains("quorum")));
}

#[test]
fn a_removal_that_would_lose_quorum_waits() {
    let mut s = Sim::running(3, "1.0");
    s.replicas = 1;
    s.down = Some(2);
    // Removing member 3 would leave voters {1, 2} with only 1 healthy.
    assert!(matches!(plan(&s.observe()), Step::Degraded(d) if d.contains("no quorum")));
}

#[test]
fn scaling_up_waits_while_a_voter_is_down() {
    let mut s = Sim::running(3, "1.0");
    s.replicas = 5;
    s.pods_wanted = Some(4);
    s.pods.insert(3, pod(3, "1.0"));
    s.down = Some(3);
    assert!(matches!(plan(&s.observe()), Step::Degraded(d) if d.contains("caught up")));
}

#[test]
fn a_member_that_lost_its_volume_is_removed_and_rejoins_as_a_learner() {
    let mut s = Sim::running(3, "1.0");
    s.replaced = vec![1];
    if let Some(m) = s.members.get_mut(&2) {
        m.applied = 0;
    }
    assert_eq!(s.converge(20), Step::Converged);
    assert_eq!(
        s.actions(),
        vec![
            Step::RemoveMember(2, Removal::Replace),
            Step::AddLearner(1),
            Step::Promote(2),
        ]
    );
}

#[test]
fn a_leader_that_lost_its_volume_hands_over_first() {
    let mut s = Sim::running(3, "1.0");
    s.replaced = vec![0];
    let step = plan(&s.observe());
    assert!(matches!(step, Step::MoveLeader { from: 1, .. }), "{step:?}");
}

#[test]
fn stray_learners_beyond_the_spec_are_removed() {
    let mut s = Sim::running(3, "1.0");
    s.pods_wanted = Some(4);
    s.pods.insert(3, pod(3, "1.0"));
    s.members.insert(
        4,
        SimMember {
            learner: true,
            applied: 0,
        },
    );
    assert_eq!(
        plan(&s.observe()),
        Step::RemoveMember(4, Removal::StrayLearner)
    );
    assert_eq!(s.converge(10), Step::Converged);
    assert_eq!(s.pods_wanted, Some(3));
}

#[test]
fn a_single_member_cluster_upgrades_in_place() {
    let mut s = Sim::running(1, "1.0");
    s.version = "1.1".into();
    s.template_version = "1.1".into();
    assert_eq!(plan(&s.observe()), Step::RestartPod(0));
}
