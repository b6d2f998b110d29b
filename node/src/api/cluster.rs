//! etcd's Cluster service: member listing and membership changes, which the leader carries out
//! one at a time through Raft (learners first, promoted once caught up).

use super::{Api, status};
use crate::auth::Caller;
use crate::consensus::{MemberNode, MembershipChange, NodeId, NodeStatus};
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::cluster_server::Cluster;
use tonic::{Request, Response, Status};

pub struct ClusterService {
    api: Api,
}

impl ClusterService {
    pub fn new(api: Api) -> ClusterService {
        ClusterService { api }
    }
}

pub fn members_out(s: &NodeStatus) -> Vec<pb::Member> {
    s.nodes
        .iter()
        .map(|(id, n)| member_out(*id, n, s.learners.contains(id)))
        .collect()
}

fn member_out(id: NodeId, n: &MemberNode, learner: bool) -> pb::Member {
    pb::Member {
        id,
        name: n.name.clone(),
        peer_ur_ls: vec![n.peer_url.clone()],
        client_ur_ls: n.client_urls.clone(),
        is_learner: learner,
    }
}

/// Member IDs for members added without one: a stable hash of the peer URL.
pub fn derive_member_id(peer_url: &str) -> NodeId {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(peer_url.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // Keep IDs positive in signed representations and never 0.
    (u64::from_be_bytes(b) >> 1).max(1)
}

fn check_url(u: &str) -> Result<(), Status> {
    let ok = (u.starts_with("http://") || u.starts_with("https://"))
        && u.split("://")
            .nth(1)
            .map(|rest| rest.contains(':') && !rest.contains('/'))
            .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(status::invalid(status::BAD_URLS))
    }
}

impl ClusterService {
    async fn members_after(&self) -> Result<Vec<pb::Member>, Status> {
        // Wait until the change is visible here so the reply shows it.
        self.api.linearize().await?;
        Ok(members_out(&self.api.consensus.status()))
    }

    /// The members after removing `id`. A member that removed itself gets no more entries from
    /// the leader, so it cannot wait to see the change: it answers from what it knows. So does
    /// any member once the leader removed itself: a linearizable wait would need the next
    /// leader, an election away, and the removal has committed already.
    async fn members_after_removing(
        &self,
        id: u64,
        was_leader: bool,
    ) -> Result<Vec<pb::Member>, Status> {
        if id != self.api.consensus.id() && !was_leader {
            return self.members_after().await;
        }
        let mut members = members_out(&self.api.consensus.status());
        members.retain(|m| m.id != id);
        Ok(members)
    }

    async fn change(&self, caller: &Caller, change: MembershipChange) -> Result<(), Status> {
        self.api
            .consensus
            .change_membership(change, Some(caller.credential.clone()))
            .await
            .map_err(|e| status::from_propose(&e))
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        req: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.require_admin(&caller.principal)?;
        let r = req.into_inner();
        let [peer_url] = r.peer_ur_ls.as_slice() else {
            return Err(status::invalid(
                "etcdserver: given member URLs are invalid: give exactly one peer URL",
            ));
        };
        check_url(peer_url)?;
        let s = self.api.consensus.status();
        if s.nodes.values().any(|n| &n.peer_url == peer_url) {
            return Err(Status::failed_precondition(status::PEER_URL_EXISTS));
        }
        let id = if r.member_id != 0 {
            r.member_id
        } else {
            derive_member_id(peer_url)
        };
        if s.nodes.contains_key(&id) {
            return Err(Status::failed_precondition(status::MEMBER_EXISTS));
        }
        let node = MemberNode {
            name: String::new(),
            peer_url: peer_url.clone(),
            client_urls: Vec::new(),
        };
        let change = if r.is_learner {
            MembershipChange::AddLearner {
                id,
                node: node.clone(),
            }
        } else {
            MembershipChange::AddVoter {
                id,
                node: node.clone(),
            }
        };
        self.change(&caller, change).await?;
        tracing::info!(member = id, %peer_url, learner = r.is_learner, "member added");
        Ok(Response::new(pb::MemberAddResponse {
            header: self.api.header(0),
            member: Some(member_out(id, &node, r.is_learner)),
            members: self.members_after().await?,
        }))
    }

    async fn member_remove(
        &self,
        req: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.require_admin(&caller.principal)?;
        let id = req.into_inner().id;
        let s = self.api.consensus.status();
        if !s.nodes.contains_key(&id) {
            return Err(Status::not_found(status::MEMBER_NOT_FOUND));
        }
        if s.voters.len() == 1 && s.voters.contains(&id) {
            return Err(Status::failed_precondition(
                "etcdserver: re-configuration failed: cannot remove the last voting member",
            ));
        }
        let was_leader = s.leader == Some(id);
        self.change(&caller, MembershipChange::Remove { id })
            .await?;
        tracing::info!(member = id, "member removed");
        Ok(Response::new(pb::MemberRemoveResponse {
            header: self.api.header(0),
            members: self.members_after_removing(id, was_leader).await?,
        }))
    }

    async fn member_update(
        &self,
        req: Request<pb::MemberUpdateRequest>,
    ) -> Result<Response<pb::MemberUpdateResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.require_admin(&caller.principal)?;
        let r = req.into_inner();
        let [peer_url] = r.peer_ur_ls.as_slice() else {
            return Err(status::invalid(status::BAD_URLS));
        };
        check_url(peer_url)?;
        let s = self.api.consensus.status();
        let Some(node) = s.nodes.get(&r.id) else {
            return Err(Status::not_found(status::MEMBER_NOT_FOUND));
        };
        if s.nodes
            .iter()
            .any(|(id, n)| *id != r.id && &n.peer_url == peer_url)
        {
            return Err(Status::failed_precondition(status::PEER_URL_EXISTS));
        }
        let node = MemberNode {
            peer_url: peer_url.clone(),
            ..node.clone()
        };
        self.change(&caller, MembershipChange::UpdateNode { id: r.id, node })
            .await?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: self.api.header(0),
            members: self.members_after().await?,
        }))
    }

    async fn member_list(
        &self,
        req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Api::principal(&req)?;
        if req.get_ref().linearizable {
            self.api.linearize().await?;
        }
        Ok(Response::new(pb::MemberListResponse {
            header: self.api.header(0),
            members: members_out(&self.api.consensus.status()),
        }))
    }

    async fn member_promote(
        &self,
        req: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.require_admin(&caller.principal)?;
        let id = req.into_inner().id;
        let s = self.api.consensus.status();
        if !s.nodes.contains_key(&id) {
            return Err(Status::not_found(status::MEMBER_NOT_FOUND));
        }
        if !s.learners.contains(&id) {
            return Err(Status::failed_precondition(status::NOT_LEARNER));
        }
        self.change(&caller, MembershipChange::Promote { id })
            .await?;
        tracing::info!(member = id, "learner promoted to voter");
        Ok(Response::new(pb::MemberPromoteResponse {
            header: self.api.header(0),
            members: self.members_after().await?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_ids() {
        assert!(check_url("http://10.0.0.1:2380").is_ok());
        assert!(check_url("https://a.b.svc:2380").is_ok());
        assert!(check_url("10.0.0.1:2380").is_err());
        assert!(check_url("http://host").is_err());
        assert_eq!(
            derive_member_id("http://a:1"),
            derive_member_id("http://a:1")
        );
        assert_ne!(
            derive_member_id("http://a:1"),
            derive_member_id("http://b:1")
        );
    }
}
