//! Cluster alarms (NOSPACE, CORRUPT), changed only through the Raft log and
//! persisted in the `meta` column family.

use std::sync::RwLock;

use prost::Message;
use rocksdb::{WriteBatch, DB};
use tessera_proto::etcdserverpb::{AlarmMember, AlarmResponse, AlarmType};

use crate::db::CF_META;
use crate::mvcc::StoreError;

const META_ALARMS: &[u8] = b"alarms";

#[derive(Default)]
pub struct Alarms {
    active: RwLock<Vec<AlarmMember>>,
}

impl Alarms {
    pub fn load(db: &DB) -> Result<Self, StoreError> {
        let alarms = Alarms::default();
        alarms.reload(db)?;
        Ok(alarms)
    }

    pub fn reload(&self, db: &DB) -> Result<(), StoreError> {
        let cf = db
            .cf_handle(CF_META)
            .ok_or(StoreError::MissingColumnFamily(CF_META))?;
        let list = match db.get_cf(cf, META_ALARMS)? {
            Some(raw) => AlarmResponse::decode(raw.as_slice())?.alarms,
            None => Vec::new(),
        };
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = list;
        Ok(())
    }

    /// Active alarms of type `filter` (NONE = all), as etcd's alarm store lists them.
    pub fn list(&self, filter: AlarmType) -> Vec<AlarmMember> {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|a| filter == AlarmType::None || a.alarm == filter as i32)
            .cloned()
            .collect()
    }

    pub fn is_active(&self, alarm: AlarmType) -> bool {
        !self.list(alarm).is_empty()
    }

    /// Computes the alarm list after activating (or deactivating) `alarm` for
    /// `member`. Returns the changed alarm and the new list, or None when
    /// nothing changes.
    pub fn plan_change(
        &self,
        member: u64,
        alarm: AlarmType,
        activate: bool,
    ) -> Option<(AlarmMember, Vec<AlarmMember>)> {
        if alarm == AlarmType::None {
            return None;
        }
        let entry = AlarmMember {
            member_id: member,
            alarm: alarm as i32,
        };
        let mut list = self.list(AlarmType::None);
        let present = list.contains(&entry);
        match (activate, present) {
            (true, false) => list.push(entry),
            (false, true) => list.retain(|a| a != &entry),
            _ => return None,
        }
        Some((entry, list))
    }

    /// Stages `list` into `batch`; call [`Alarms::publish`] once it is written.
    pub fn stage(db: &DB, batch: &mut WriteBatch, list: &[AlarmMember]) -> Result<(), StoreError> {
        let cf = db
            .cf_handle(CF_META)
            .ok_or(StoreError::MissingColumnFamily(CF_META))?;
        batch.put_cf(
            cf,
            META_ALARMS,
            AlarmResponse {
                header: None,
                alarms: list.to_vec(),
            }
            .encode_to_vec(),
        );
        Ok(())
    }

    pub fn publish(&self, list: Vec<AlarmMember>) {
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = list;
    }
}
