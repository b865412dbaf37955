//! What the connection tasks and the HTTP handlers share: the state behind
//! its mutex, the token agents must present, and the shutdown flag.

use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::state::State;

pub struct Shared {
    state: Mutex<State>,
    token: Box<[u8]>,
    pub shutting_down: AtomicBool,
}

impl Shared {
    pub fn new(state: State, token: String) -> Shared {
        Shared {
            state: Mutex::new(state),
            token: token.into_bytes().into_boxed_slice(),
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Locks the state. Nothing panics while holding it, but should that
    /// ever happen the data is still usable: ignore the poison.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Compares without an early exit on the first differing byte.
    pub fn token_matches(&self, given: &[u8]) -> bool {
        let expected = &self.token;
        let mut diff = u8::from(expected.len() != given.len());
        for (i, b) in expected.iter().enumerate() {
            diff |= b ^ given.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}
