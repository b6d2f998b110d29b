//! What the leader accepts from other members on behalf of clients. A member forwards a
//! client's write (or membership change) with the client's credential; the leader verifies
//! that credential itself and authorizes the request as that client, so a member, or anyone
//! who reaches the peer port, can never act with more rights than the client it speaks for.

use super::Api;
use crate::consensus::{Gatekeeper, MembershipChange, ProposeError};
use crate::model::{Credential, Principal, Proposal};

pub struct ForwardedGate {
    api: Api,
}

impl ForwardedGate {
    pub fn new(api: Api) -> ForwardedGate {
        ForwardedGate { api }
    }

    /// Who `credential` proves the caller is.
    fn principal_of(
        &self,
        credential: Option<&Credential>,
        peer_verified: bool,
    ) -> Result<Principal, ProposeError> {
        let principal = match credential {
            None => {
                return Err(ProposeError::Unauthenticated(
                    "etcdserver: a forwarded request must carry its caller's credential".into(),
                ));
            }
            Some(Credential::Token(t)) => {
                self.api
                    .authn
                    .verify(t)
                    .map_err(|e| {
                        ProposeError::Unauthenticated(
                            super::status::unauthenticated(&e).message().to_string(),
                        )
                    })?
                    .principal
            }
            Some(Credential::Certificate(cn)) => {
                if !peer_verified {
                    return Err(ProposeError::Unauthenticated(
                        "etcdserver: a certificate identity is only accepted from a member that \
                         presented its member certificate"
                            .into(),
                    ));
                }
                if self.api.executor.auth().get().user(cn).is_none() {
                    return Err(ProposeError::Unauthenticated(format!(
                        "etcdserver: the client certificate's common name {cn:?} names no user"
                    )));
                }
                Principal {
                    name: cn.clone(),
                    roles: Vec::new(),
                    user_rev: None,
                }
            }
        };
        if !self.api.executor.auth().get().token_current(&principal) {
            return Err(ProposeError::Unauthenticated(
                super::status::INVALID_TOKEN.to_string(),
            ));
        }
        Ok(principal)
    }
}

impl Gatekeeper for ForwardedGate {
    fn admit_proposal(
        &self,
        proposal: &mut Proposal,
        credential: Option<&Credential>,
        peer_verified: bool,
    ) -> Result<(), ProposeError> {
        let principal = self.principal_of(credential, peer_verified)?;
        if self.api.sealer.enabled() && crate::apply::carries_plaintext(&proposal.command) {
            return Err(ProposeError::Rejected(
                "plaintext values are refused: this cluster encrypts values at rest (the member \
                 that forwarded this has no keyring)"
                    .into(),
            ));
        }
        proposal.principal = Some(principal);
        Ok(())
    }

    fn admit_membership(
        &self,
        change: &MembershipChange,
        credential: Option<&Credential>,
        peer_verified: bool,
    ) -> Result<(), ProposeError> {
        if credential.is_none()
            && peer_verified
            && matches!(change, MembershipChange::UpdateNode { .. })
        {
            // A member publishing its own name and URLs.
            return Ok(());
        }
        let principal = self.principal_of(credential, peer_verified)?;
        if self.api.grants(&principal).root {
            Ok(())
        } else {
            self.api.metrics.permission_denials.inc();
            Err(ProposeError::PermissionDenied)
        }
    }
}
