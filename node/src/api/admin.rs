//! raftkv's Admin service: operations etcd's API has no call for. Root only.

use super::{Api, status};
use crate::crypto::envelope::Envelope;
use crate::model::{ApplyOutput, Command, Reencrypted};
use raftkv_proto::admin as pb;
use raftkv_proto::admin::admin_server::Admin;
use tonic::{Request, Response, Status};

pub struct AdminService {
    api: Api,
}

impl AdminService {
    pub fn new(api: Api) -> AdminService {
        AdminService { api }
    }

    /// Up to `limit` stored values not sealed with `active`, re-sealed.
    fn next_batch(&self, active: u32, limit: usize) -> Result<Vec<Reencrypted>, Status> {
        let view = self
            .api
            .consensus
            .store()
            .read_view()
            .map_err(|e| status::from_storage(&e))?;
        let mut out = Vec::new();
        let mut failure = None;
        view.scan_history(&mut |key, rec| {
            let current = Envelope::parse(&rec.value).ok().and_then(|e| e.key_id());
            if current == Some(active) {
                return Ok(true);
            }
            match self.api.sealer.open(&key, &rec.value) {
                Ok(plain) => match self.api.sealer.seal(&key, &plain) {
                    Ok(new_value) => out.push(Reencrypted {
                        key,
                        mod_revision: rec.mod_revision,
                        old_value: rec.value,
                        new_value,
                    }),
                    Err(e) => {
                        failure = Some(Status::internal(format!("encrypting: {e}")));
                        return Ok(false);
                    }
                },
                Err(e) => {
                    failure = Some(status::undecryptable(&key, &e));
                    return Ok(false);
                }
            }
            Ok(out.len() < limit)
        })
        .map_err(|e| status::from_storage(&e))?;
        match failure {
            Some(s) => Err(s),
            None => Ok(out),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn reencrypt(
        &self,
        req: Request<pb::ReencryptRequest>,
    ) -> Result<Response<pb::ReencryptResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.require_admin(&caller.principal)?;
        let Some((active, _)) = self.api.sealer.active_key() else {
            return Err(Status::failed_precondition(
                "encryption at rest is not configured on this member (no keyring)",
            ));
        };
        let batch = match req.into_inner().batch_size {
            0 => 256,
            n => n as usize,
        };
        let mut total = 0u64;
        // A scan that makes no progress (values changed under us) is retried a few times.
        let mut idle_rounds = 0;
        loop {
            self.api.linearize().await?;
            let items = self.next_batch(active, batch)?;
            if items.is_empty() {
                break;
            }
            let key = self.api.sealing_key()?;
            let (out, _) = self
                .api
                .propose(Some(&caller), key, Command::Reencrypt(items))
                .await?;
            let replaced = match out {
                ApplyOutput::Reencrypted { replaced } => replaced,
                _ => 0,
            };
            total += replaced;
            if replaced == 0 {
                idle_rounds += 1;
                if idle_rounds > 5 {
                    return Err(Status::aborted(
                        "re-encryption makes no progress: values keep changing; retry when writes calm down",
                    ));
                }
            } else {
                idle_rounds = 0;
            }
        }
        tracing::info!(
            reencrypted = total,
            active_key = active,
            "re-encrypted stored values"
        );
        Ok(Response::new(pb::ReencryptResponse {
            reencrypted: total,
            active_key: active,
        }))
    }
}
