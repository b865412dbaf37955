//! What the connection tasks and the HTTP handlers share: the state behind
//! its mutex, the tokens agents may present, and the shutdown flag.

use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::state::State;
use crate::tokens::{TokenOwner, Tokens};

pub struct Shared {
    state: Mutex<State>,
    tokens: Tokens,
    pub shutting_down: AtomicBool,
}

impl Shared {
    pub fn new(state: State, tokens: Tokens) -> Shared {
        Shared {
            state: Mutex::new(state),
            tokens,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Locks the state. Nothing panics while holding it, but should that
    /// ever happen the data is still usable: ignore the poison.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whose token `given` is, if anyone's.
    pub fn token_owner(&self, given: &[u8]) -> Option<TokenOwner> {
        self.tokens.owner(given)
    }
}
