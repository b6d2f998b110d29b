//! etcd's Auth service: users and roles in the replicated state, password logins that return a
//! JWT, and etcd's auth enable/disable switch (which turns role checks on and off; a valid token
//! is required on every request either way).

use super::convert::{perm_out, perm_type_in};
use super::{Api, status};
use crate::auth::Caller;
use crate::auth::password;
use crate::model::{AuthCommand, Command, Permission, Principal};
use crate::storage::auth_state::{AuthSource, ROOT, User};
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::auth_server::Auth;
use tonic::{Request, Response, Status};

pub struct AuthService {
    api: Api,
}

impl AuthService {
    pub fn new(api: Api) -> AuthService {
        AuthService { api }
    }

    async fn change(
        &self,
        caller: Caller,
        cmd: AuthCommand,
    ) -> Result<Option<pb::ResponseHeader>, Status> {
        let (_, rev) = self
            .api
            .propose(Some(&caller), None, Command::Auth(cmd))
            .await?;
        Ok(self.api.header(rev))
    }

    /// Reading users and roles: administrators see all, others only themselves.
    fn may_read(
        &self,
        principal: &Principal,
        user: Option<&str>,
        role: Option<&str>,
    ) -> Result<(), Status> {
        let view = self
            .api
            .consensus
            .store()
            .read_view()
            .map_err(|e| status::from_storage(&e))?;
        if self.api.grants(principal).root {
            return Ok(());
        }
        if let Some(u) = user
            && u == principal.name
        {
            return Ok(());
        }
        if let Some(r) = role {
            let own = view
                .user(&principal.name)
                .map_err(|e| status::from_storage(&e))?
                .map(|u| u.roles.contains(r))
                .unwrap_or(false);
            if own || principal.roles.iter().any(|pr| pr == r) {
                return Ok(());
            }
        }
        self.api.metrics.permission_denials.inc();
        Err(status::denied())
    }

    async fn hash(
        &self,
        plain: String,
        hashed: String,
        no_password: bool,
    ) -> Result<Option<String>, Status> {
        if no_password {
            return Ok(None);
        }
        if !hashed.is_empty() {
            if !password::is_bcrypt_hash(&hashed) {
                return Err(status::invalid(
                    "etcdserver: hashedPassword is not a bcrypt hash",
                ));
            }
            return Ok(Some(hashed));
        }
        if plain.is_empty() {
            return Err(status::invalid(
                "etcdserver: a password is required (or create the user with no_password)",
            ));
        }
        // bcrypt is deliberately slow: keep it off the async workers.
        tokio::task::spawn_blocking(move || password::hash(&plain))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map(Some)
            .map_err(Status::internal)
    }
}

fn require_name(name: &str, empty: &str) -> Result<(), Status> {
    if name.is_empty() {
        Err(status::invalid(empty))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        req: Request<pb::AuthEnableRequest>,
    ) -> Result<Response<pb::AuthEnableResponse>, Status> {
        let p = Api::caller(&req)?;
        Ok(Response::new(pb::AuthEnableResponse {
            header: self.change(p, AuthCommand::Enable).await?,
        }))
    }

    async fn auth_disable(
        &self,
        req: Request<pb::AuthDisableRequest>,
    ) -> Result<Response<pb::AuthDisableResponse>, Status> {
        let p = Api::caller(&req)?;
        Ok(Response::new(pb::AuthDisableResponse {
            header: self.change(p, AuthCommand::Disable).await?,
        }))
    }

    async fn auth_status(
        &self,
        req: Request<pb::AuthStatusRequest>,
    ) -> Result<Response<pb::AuthStatusResponse>, Status> {
        Api::principal(&req)?;
        let store = self.api.consensus.store();
        Ok(Response::new(pb::AuthStatusResponse {
            header: self.api.header(0),
            enabled: store.enabled().map_err(|e| status::from_storage(&e))?,
            auth_revision: store
                .auth_revision()
                .map_err(|e| status::from_storage(&e))?,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<pb::AuthenticateRequest>,
    ) -> Result<Response<pb::AuthenticateResponse>, Status> {
        let from = super::connections::remote_of(&req).map(|a| a.ip());
        let r = req.into_inner();
        let attempt = self.api.logins.admit(from)?;
        self.api.linearize().await?;
        let store = self.api.consensus.store();
        if !store.enabled().map_err(|e| status::from_storage(&e))? {
            return Err(Status::failed_precondition(status::AUTH_NOT_ENABLED));
        }
        let user = store.user(&r.name).map_err(|e| status::from_storage(&e))?;
        let fail = |attempt: crate::auth::logins::Attempt<'_>| {
            attempt.failed();
            self.api
                .metrics
                .auth_failures
                .with_label_values(&["password"])
                .inc();
            tracing::info!(user = %r.name, "refused a login with a wrong user name or password");
            Status::invalid_argument(status::AUTH_FAILED)
        };
        // An unknown user (or one without a password) costs the same bcrypt verification as a
        // known one, so the answer's timing does not tell which user names exist.
        let (hash, token_rev) = match &user {
            Some(User {
                password_hash: Some(h),
                token_rev,
                ..
            }) => (Some(h.clone()), *token_rev),
            _ => (None, 0),
        };
        let password = r.password.clone();
        let ok = self.api.logins.verify(password, hash).await?;
        if !ok {
            return Err(fail(attempt));
        }
        drop(attempt);
        let token = self
            .api
            .authn
            .issue_bound(&r.name, &[], Some(token_rev))
            .map_err(|e| {
                Status::failed_precondition(format!("etcdserver: cannot issue a token: {e}"))
            })?;
        Ok(Response::new(pb::AuthenticateResponse {
            header: self.api.header(0),
            token,
        }))
    }

    async fn user_add(
        &self,
        req: Request<pb::AuthUserAddRequest>,
    ) -> Result<Response<pb::AuthUserAddResponse>, Status> {
        let p = Api::caller(&req)?;
        let r = req.into_inner();
        require_name(&r.name, status::USER_EMPTY)?;
        self.api.require_admin(&p.principal)?;
        let no_password = r.options.map(|o| o.no_password).unwrap_or(false);
        let password_hash = self
            .hash(r.password, r.hashed_password, no_password)
            .await?;
        Ok(Response::new(pb::AuthUserAddResponse {
            header: self
                .change(
                    p,
                    AuthCommand::UserAdd {
                        name: r.name,
                        password_hash,
                    },
                )
                .await?,
        }))
    }

    async fn user_get(
        &self,
        req: Request<pb::AuthUserGetRequest>,
    ) -> Result<Response<pb::AuthUserGetResponse>, Status> {
        let p = Api::caller(&req)?;
        let name = req.into_inner().name;
        self.may_read(&p.principal, Some(&name), None)?;
        let user = self
            .api
            .consensus
            .store()
            .user(&name)
            .map_err(|e| status::from_storage(&e))?
            .ok_or_else(|| Status::failed_precondition("etcdserver: user name not found"))?;
        Ok(Response::new(pb::AuthUserGetResponse {
            header: self.api.header(0),
            roles: user.roles.into_iter().collect(),
        }))
    }

    async fn user_list(
        &self,
        req: Request<pb::AuthUserListRequest>,
    ) -> Result<Response<pb::AuthUserListResponse>, Status> {
        let p = Api::caller(&req)?;
        self.may_read(&p.principal, None, None)?;
        Ok(Response::new(pb::AuthUserListResponse {
            header: self.api.header(0),
            users: self
                .api
                .consensus
                .store()
                .users()
                .map_err(|e| status::from_storage(&e))?,
        }))
    }

    async fn user_delete(
        &self,
        req: Request<pb::AuthUserDeleteRequest>,
    ) -> Result<Response<pb::AuthUserDeleteResponse>, Status> {
        let p = Api::caller(&req)?;
        let name = req.into_inner().name;
        require_name(&name, status::USER_EMPTY)?;
        Ok(Response::new(pb::AuthUserDeleteResponse {
            header: self.change(p, AuthCommand::UserDelete { name }).await?,
        }))
    }

    async fn user_change_password(
        &self,
        req: Request<pb::AuthUserChangePasswordRequest>,
    ) -> Result<Response<pb::AuthUserChangePasswordResponse>, Status> {
        let p = Api::caller(&req)?;
        let r = req.into_inner();
        require_name(&r.name, status::USER_EMPTY)?;
        self.api.require_admin(&p.principal)?;
        let Some(password_hash) = self.hash(r.password, r.hashed_password, false).await? else {
            return Err(status::invalid("etcdserver: a password is required"));
        };
        Ok(Response::new(pb::AuthUserChangePasswordResponse {
            header: self
                .change(
                    p,
                    AuthCommand::UserChangePassword {
                        name: r.name,
                        password_hash,
                    },
                )
                .await?,
        }))
    }

    async fn user_grant_role(
        &self,
        req: Request<pb::AuthUserGrantRoleRequest>,
    ) -> Result<Response<pb::AuthUserGrantRoleResponse>, Status> {
        let p = Api::caller(&req)?;
        let r = req.into_inner();
        require_name(&r.user, status::USER_EMPTY)?;
        require_name(&r.role, status::ROLE_EMPTY)?;
        Ok(Response::new(pb::AuthUserGrantRoleResponse {
            header: self
                .change(
                    p,
                    AuthCommand::UserGrantRole {
                        user: r.user,
                        role: r.role,
                    },
                )
                .await?,
        }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<pb::AuthUserRevokeRoleRequest>,
    ) -> Result<Response<pb::AuthUserRevokeRoleResponse>, Status> {
        let p = Api::caller(&req)?;
        let r = req.into_inner();
        require_name(&r.name, status::USER_EMPTY)?;
        Ok(Response::new(pb::AuthUserRevokeRoleResponse {
            header: self
                .change(
                    p,
                    AuthCommand::UserRevokeRole {
                        user: r.name,
                        role: r.role,
                    },
                )
                .await?,
        }))
    }

    async fn role_add(
        &self,
        req: Request<pb::AuthRoleAddRequest>,
    ) -> Result<Response<pb::AuthRoleAddResponse>, Status> {
        let p = Api::caller(&req)?;
        let name = req.into_inner().name;
        require_name(&name, status::ROLE_EMPTY)?;
        Ok(Response::new(pb::AuthRoleAddResponse {
            header: self.change(p, AuthCommand::RoleAdd { name }).await?,
        }))
    }

    async fn role_get(
        &self,
        req: Request<pb::AuthRoleGetRequest>,
    ) -> Result<Response<pb::AuthRoleGetResponse>, Status> {
        let p = Api::caller(&req)?;
        let name = req.into_inner().role;
        self.may_read(&p.principal, None, Some(&name))?;
        let perms = if name == ROOT {
            Vec::new()
        } else {
            self.api
                .consensus
                .store()
                .role(&name)
                .map_err(|e| status::from_storage(&e))?
                .ok_or_else(|| Status::failed_precondition("etcdserver: role name not found"))?
                .perms
        };
        Ok(Response::new(pb::AuthRoleGetResponse {
            header: self.api.header(0),
            perm: perms.iter().map(perm_out).collect(),
        }))
    }

    async fn role_list(
        &self,
        req: Request<pb::AuthRoleListRequest>,
    ) -> Result<Response<pb::AuthRoleListResponse>, Status> {
        let p = Api::caller(&req)?;
        self.may_read(&p.principal, None, None)?;
        Ok(Response::new(pb::AuthRoleListResponse {
            header: self.api.header(0),
            roles: self
                .api
                .consensus
                .store()
                .roles()
                .map_err(|e| status::from_storage(&e))?,
        }))
    }

    async fn role_delete(
        &self,
        req: Request<pb::AuthRoleDeleteRequest>,
    ) -> Result<Response<pb::AuthRoleDeleteResponse>, Status> {
        let p = Api::caller(&req)?;
        let name = req.into_inner().role;
        require_name(&name, status::ROLE_EMPTY)?;
        Ok(Response::new(pb::AuthRoleDeleteResponse {
            header: self.change(p, AuthCommand::RoleDelete { name }).await?,
        }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<pb::AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<pb::AuthRoleGrantPermissionResponse>, Status> {
        let p = Api::caller(&req)?;
        let r = req.into_inner();
        require_name(&r.name, status::ROLE_EMPTY)?;
        let perm = r
            .perm
            .ok_or_else(|| status::invalid("etcdserver: permission not given"))?;
        if perm.key.is_empty() {
            return Err(status::invalid(status::EMPTY_KEY));
        }
        let perm = Permission {
            perm_type: perm_type_in(perm.perm_type)?,
            key: perm.key,
            range_end: perm.range_end,
        };
        Ok(Response::new(pb::AuthRoleGrantPermissionResponse {
            header: self
                .change(p, AuthCommand::RoleGrantPermission { name: r.name, perm })
                .await?,
        }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<pb::AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<pb::AuthRoleRevokePermissionResponse>, Status> {
        let p = Api::caller(&req)?;
        let r = req.into_inner();
        require_name(&r.role, status::ROLE_EMPTY)?;
        Ok(Response::new(pb::AuthRoleRevokePermissionResponse {
            header: self
                .change(
                    p,
                    AuthCommand::RoleRevokePermission {
                        name: r.role,
                        key: r.key,
                        range_end: r.range_end,
                    },
                )
                .await?,
        }))
    }
}
