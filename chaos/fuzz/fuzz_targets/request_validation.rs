//! Hostile client requests: any bytes a client sends are decoded as the
//! request they claim to be and go through the checks made before anything
//! is proposed (etcd's `v3rpc/key.go`), and through the permission check a
//! user's roles get. Nothing may panic; a permitted single key must lie in
//! one of the granted intervals.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tessera_fuzz::perms::UnifiedPerms;
use tessera_fuzz::validate;
use tessera_proto::authpb::{permission::Type as PermType, Role};
use tessera_proto::etcdserverpb::{DeleteRangeRequest, PutRequest, RangeRequest, TxnRequest};

/// Whether `key` lies in the permission's interval, computed the obvious way.
fn granted(role: &Role, key: &[u8], want: PermType) -> bool {
    role.key_permission.iter().any(|p| {
        let kind = PermType::try_from(p.perm_type).unwrap_or(PermType::Read);
        let kind_ok = kind == PermType::Readwrite || kind == want;
        let inside = match p.range_end.as_slice() {
            [] => key == p.key.as_slice(),
            [0] => key >= p.key.as_slice(),
            end => key >= p.key.as_slice() && key < end,
        };
        kind_ok && inside
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    match kind % 5 {
        0 => {
            if let Ok(r) = RangeRequest::decode(rest) {
                let _ = validate::check_range(&r);
            }
        }
        1 => {
            if let Ok(p) = PutRequest::decode(rest) {
                let _ = validate::check_put(&p);
            }
        }
        2 => {
            if let Ok(d) = DeleteRangeRequest::decode(rest) {
                let _ = validate::check_delete(&d);
            }
        }
        3 => {
            if let Ok(t) = TxnRequest::decode(rest) {
                let _ = validate::check_txn(&t, 128);
            }
        }
        _ => {
            // A role, then keys to check against it.
            let Some((&len, rest)) = rest.split_first() else {
                return;
            };
            let (role, keys) = rest.split_at((len as usize).min(rest.len()));
            let Ok(role) = Role::decode(role) else {
                return;
            };
            let perms = UnifiedPerms::of([&role]);
            for key in keys.chunks(3) {
                for want in [PermType::Read, PermType::Write] {
                    assert_eq!(
                        perms.allows(key, &[], want),
                        granted(&role, key, want),
                        "key {key:?} {want:?} in {role:?}"
                    );
                    // Ranges must not panic, whatever their shape.
                    let _ = perms.allows(key, &key[..key.len() / 2], want);
                    let _ = perms.allows(key, &[0], want);
                }
            }
        }
    }
});
