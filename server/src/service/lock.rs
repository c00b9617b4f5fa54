//! etcd's Lock service (v3lockpb): a mutex per name, held by the contender
//! whose key under `name/` was created first, for as long as its lease lives.

use tessera_proto::etcdserverpb::DeleteRangeRequest;
use tessera_proto::v3lockpb::lock_server::Lock;
use tessera_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use tonic::{Request, Response, Status};

use super::recipes::{
    by_create, contender_key, contenders_prefix, created_at, get_key, get_op, put_op, range_result,
    CleanupGuard, Recipes,
};

#[derive(Clone)]
pub struct LockService {
    recipes: Recipes,
}

impl LockService {
    pub fn new(recipes: Recipes) -> Self {
        LockService { recipes }
    }

    pub async fn lock(&self, r: LockRequest) -> Result<LockResponse, Status> {
        let lease = self.recipes.session_lease(r.lease).await?;
        let prefix = contenders_prefix(&r.name);
        let key = contender_key(&prefix, lease);
        // Join the queue (or find our key if this lease already queued), and
        // read the current holder, in one transaction.
        let resp = self
            .recipes
            .txn(
                vec![created_at(&key, 0)],
                vec![
                    put_op(&key, b"", lease),
                    get_op(by_create(&prefix, true, 0)),
                ],
                vec![get_op(get_key(&key)), get_op(by_create(&prefix, true, 0))],
            )
            .await?;
        let mut my_rev = resp.header.as_ref().map_or(0, |h| h.revision);
        if !resp.succeeded {
            my_rev = range_result(&resp, 0)
                .and_then(|r| r.kvs.first())
                .map_or(my_rev, |kv| kv.create_revision);
        }
        let holder = range_result(&resp, 1).and_then(|r| r.kvs.first());
        if holder.is_none_or(|kv| kv.create_revision == my_rev) {
            return Ok(LockResponse {
                header: resp.header,
                key,
            });
        }
        let guard = CleanupGuard::new(&self.recipes, &key, my_rev);
        let header = self.recipes.wait_deletes(&prefix, my_rev - 1).await?;
        guard.disarm();
        Ok(LockResponse { header, key })
    }

    pub async fn unlock(&self, r: UnlockRequest) -> Result<UnlockResponse, Status> {
        let resp = self
            .recipes
            .kv
            .do_delete_range(
                self.recipes.who(),
                DeleteRangeRequest {
                    key: r.key,
                    ..Default::default()
                },
            )
            .await?;
        Ok(UnlockResponse {
            header: resp.header,
        })
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let svc = LockService::new(self.recipes.for_caller(&req)?);
        LockService::lock(&svc, req.into_inner())
            .await
            .map(Response::new)
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let svc = LockService::new(self.recipes.for_caller(&req)?);
        LockService::unlock(&svc, req.into_inner())
            .await
            .map(Response::new)
    }
}
