//! Who may do what on the control socket. Callers are identified by `SO_PEERCRED`.

use rebalancer_proto::control::ControlRequest;

/// The peer of a control connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Privileged uids: root, the SlurmUser and the configured operators.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub slurm_user: Option<u32>,
    pub operators: Vec<u32>,
}

impl Access {
    pub fn is_privileged(&self, c: &Caller) -> bool {
        c.uid == 0 || self.slurm_user == Some(c.uid) || self.operators.contains(&c.uid)
    }

    /// Whether the caller may send this request at all.
    pub fn check(&self, c: &Caller, req: &ControlRequest) -> Result<(), String> {
        if req.is_mutating() && !self.is_privileged(c) {
            return Err(format!(
                "uid {} may not {}: only root, the SlurmUser and configured operators may change things",
                c.uid,
                req.op()
            ));
        }
        Ok(())
    }

    /// Whether the caller may see a job or container owned by `owner` (unknown owners are
    /// visible to privileged callers only).
    pub fn sees(&self, c: &Caller, owner: Option<u32>) -> bool {
        self.is_privileged(c) || owner == Some(c.uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rebalancer_proto::control::{MigrateTarget, PolicyState};

    fn caller(uid: u32) -> Caller {
        Caller {
            uid,
            gid: uid,
            pid: None,
        }
    }

    #[test]
    fn only_privileged_callers_mutate() {
        let a = Access {
            slurm_user: Some(64030),
            operators: vec![1500],
        };
        let migrate = ControlRequest::Migrate {
            target: MigrateTarget::Job { job_id: 1 },
            destination: None,
            mode: None,
            watch: false,
        };
        let update = ControlRequest::UpdatePolicy {
            name: "x".into(),
            state: PolicyState::Disabled,
        };
        for uid in [0, 64030, 1500] {
            assert!(a.check(&caller(uid), &migrate).is_ok(), "uid {uid}");
            assert!(a.check(&caller(uid), &update).is_ok(), "uid {uid}");
        }
        let e = a.check(&caller(1000), &migrate).expect_err("user");
        assert!(e.contains("uid 1000 may not migrate"), "{e}");
        assert!(a
            .check(&caller(1000), &ControlRequest::PolicyReload)
            .is_err());
        assert!(a
            .check(&caller(1000), &ControlRequest::ShowNodes { name: None })
            .is_ok());
        assert!(a
            .check(&caller(1000), &ControlRequest::History { limit: None })
            .is_ok());
    }

    #[test]
    fn users_see_their_own_jobs_only() {
        let a = Access {
            slurm_user: None,
            operators: vec![],
        };
        assert!(a.sees(&caller(1000), Some(1000)));
        assert!(!a.sees(&caller(1000), Some(1001)));
        assert!(!a.sees(&caller(1000), None));
        assert!(a.sees(&caller(0), Some(1001)));
    }
}
