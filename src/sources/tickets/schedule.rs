//! The rotation schedule: a pure function of the shared state's times and the clock, so
//! that every replica reading the same state reaches the same decision, and a restart
//! (which reads the state again) decides nothing new.
//!
//! A key goes through three roles, and the served list is always
//! `[active, previous..., pending]` (Envoy encrypts with the first, decrypts with all):
//! 1. **pending** (decrypt-only, last): staged `propagation` before the rotation is due,
//!    so that every proxy of the fleet holds it before any proxy encrypts with it;
//! 2. **active** (first): promoted once the rotation is due *and* it has been pending
//!    for the whole `propagation` window, whatever the delay (a fleet that was down
//!    for a day stages first, then promotes a window later);
//! 3. **previous** (decrypt-only): the last `keep` active keys.

use std::time::Duration;

use crate::pki::KeyBytes;

/// Length of an Envoy session ticket key: 16 bytes name, 32 HMAC, 32 AES.
pub const KEY_LEN: usize = 80;

/// One key and when it was made (Unix milliseconds).
#[derive(Clone)]
pub struct Key {
    pub bytes: KeyBytes,
    pub created_ms: u64,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("created_ms", &self.created_ms).finish_non_exhaustive()
    }
}

/// What the shared state holds for one name.
#[derive(Clone, Debug)]
pub struct State {
    pub active: Key,
    /// When `active` was promoted (Unix ms): the rotation is due `rotate_every` later.
    pub active_since_ms: u64,
    /// Newest first.
    pub previous: Vec<Key>,
    pub pending: Option<Key>,
}

impl State {
    /// The keys as served and persisted: the first encrypts, the pending one is last.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        std::iter::once(&self.active).chain(&self.previous).chain(&self.pending)
    }

    /// How many keys are served (never zero: there is always an active key).
    pub fn count(&self) -> usize {
        1 + self.previous.len() + usize::from(self.pending.is_some())
    }
}

/// The settings the schedule needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub rotate_every: Duration,
    pub keep: usize,
    pub propagation: Duration,
}

/// What the state needs now.
#[derive(Debug)]
pub enum Plan {
    /// Nothing to write; look again at `next_ms` (Unix ms).
    Wait { next_ms: u64 },
    /// Write this state.
    Write(State, Step),
}

/// Which step a write is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// No state existed: the first key, active at once (no proxy has any key yet).
    Created,
    /// The next key was added, decrypt-only.
    Staged,
    /// The pending key became the active one.
    Promoted,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Created => "created",
            Step::Staged => "staged",
            Step::Promoted => "promoted",
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Schedule {
    /// The plan for `state` at `now_ms`; `new_key` makes a fresh key when one is needed.
    pub fn plan(&self, state: Option<&State>, now_ms: u64, new_key: impl FnOnce() -> KeyBytes) -> Plan {
        let Some(state) = state else {
            let active = Key { bytes: new_key(), created_ms: now_ms };
            return Plan::Write(
                State { active, active_since_ms: now_ms, previous: Vec::new(), pending: None },
                Step::Created,
            );
        };
        let due = state.active_since_ms.saturating_add(ms(self.rotate_every));
        match &state.pending {
            None => {
                let stage_at = due.saturating_sub(ms(self.propagation));
                if now_ms < stage_at {
                    return Plan::Wait { next_ms: stage_at };
                }
                let mut next = state.clone();
                next.pending = Some(Key { bytes: new_key(), created_ms: now_ms });
                Plan::Write(next, Step::Staged)
            }
            Some(pending) => {
                let promote_at = due.max(pending.created_ms.saturating_add(ms(self.propagation)));
                if now_ms < promote_at {
                    return Plan::Wait { next_ms: promote_at };
                }
                let mut previous = Vec::with_capacity(self.keep);
                previous.push(state.active.clone());
                previous.extend(state.previous.iter().cloned());
                previous.truncate(self.keep);
                Plan::Write(
                    State { active: pending.clone(), active_since_ms: now_ms, previous, pending: None },
                    Step::Promoted,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    fn schedule() -> Schedule {
        Schedule { rotate_every: Duration::from_secs(100), keep: 2, propagation: Duration::from_secs(10) }
    }

    /// Keys numbered in creation order: byte 0 is the number.
    fn keys_from(counter: &mut u8) -> impl FnOnce() -> KeyBytes + '_ {
        move || {
            *counter += 1;
            KeyBytes::new(vec![*counter; KEY_LEN])
        }
    }

    fn ids(state: &State) -> Vec<u8> {
        state.keys().map(|k| k.bytes.as_slice()[0]).collect()
    }

    fn write(plan: Plan) -> (State, Step) {
        match plan {
            Plan::Write(s, step) => (s, step),
            Plan::Wait { next_ms } => panic!("expected a write, got a wait until {next_ms}"),
        }
    }

    fn wait(plan: Plan) -> u64 {
        match plan {
            Plan::Wait { next_ms } => next_ms,
            Plan::Write(_, step) => panic!("expected a wait, got {step:?}"),
        }
    }

    #[test]
    fn stages_before_it_promotes_and_keeps_the_previous_keys() {
        let sch = schedule();
        let mut n = 0;
        let (s, step) = write(sch.plan(None, 1000 * S, keys_from(&mut n)));
        assert_eq!((step, ids(&s)), (Step::Created, vec![1]));
        // Nothing to do until propagation before the rotation is due.
        assert_eq!(wait(sch.plan(Some(&s), 1000 * S, keys_from(&mut n))), 1090 * S);
        let (s, step) = write(sch.plan(Some(&s), 1090 * S, keys_from(&mut n)));
        assert_eq!((step, ids(&s)), (Step::Staged, vec![1, 2]), "the next key is last: decrypt-only");
        assert_eq!(wait(sch.plan(Some(&s), 1095 * S, keys_from(&mut n))), 1100 * S);
        let (s, step) = write(sch.plan(Some(&s), 1100 * S, keys_from(&mut n)));
        assert_eq!((step, ids(&s)), (Step::Promoted, vec![2, 1]));
        assert_eq!(s.active_since_ms, 1100 * S);
        // Two more rotations: the oldest falls out after `keep` previous keys.
        let (s, _) = write(sch.plan(Some(&s), 1190 * S, keys_from(&mut n)));
        let (s, _) = write(sch.plan(Some(&s), 1200 * S, keys_from(&mut n)));
        assert_eq!(ids(&s), vec![3, 2, 1]);
        let (s, _) = write(sch.plan(Some(&s), 1290 * S, keys_from(&mut n)));
        assert_eq!(ids(&s), vec![3, 2, 1, 4]);
        let (s, _) = write(sch.plan(Some(&s), 1300 * S, keys_from(&mut n)));
        assert_eq!(ids(&s), vec![4, 3, 2], "key 1 dropped: keep = 2");
    }

    #[test]
    fn a_late_stage_still_waits_the_whole_propagation_window() {
        let sch = schedule();
        let mut n = 0;
        let (s, _) = write(sch.plan(None, 0, keys_from(&mut n)));
        // Every replica was down through the rotation time: stage now, not promote.
        let (s, step) = write(sch.plan(Some(&s), 5000 * S, keys_from(&mut n)));
        assert_eq!(step, Step::Staged);
        assert_eq!(wait(sch.plan(Some(&s), 5009 * S, keys_from(&mut n))), 5010 * S);
        let (s, step) = write(sch.plan(Some(&s), 5010 * S, keys_from(&mut n)));
        assert_eq!((step, ids(&s)), (Step::Promoted, vec![2, 1]));
    }

    #[test]
    fn a_reread_state_plans_nothing_new() {
        let sch = schedule();
        let mut n = 0;
        let (s, _) = write(sch.plan(None, 0, keys_from(&mut n)));
        // A restart at any time before the staging point: same wait, no key made.
        for now in [0, 1, 50 * S, 89 * S] {
            assert_eq!(wait(sch.plan(Some(&s), now, keys_from(&mut n))), 90 * S);
        }
        assert_eq!(n, 1);
        // A clock behind the writer's (another replica): waits, never rotates early.
        let (s, _) = write(sch.plan(Some(&s), 90 * S, keys_from(&mut n)));
        assert_eq!(wait(sch.plan(Some(&s), 10 * S, keys_from(&mut n))), 100 * S);
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let key = Key { bytes: KeyBytes::new(vec![0xAB; KEY_LEN]), created_ms: 7 };
        let text = format!("{key:?}");
        assert!(!text.contains("171") && !text.to_lowercase().contains("ab,"), "{text}");
        assert!(text.contains("created_ms: 7"));
    }
}
