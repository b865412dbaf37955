//! The environment layer: `NIXFLEET_<KEY>` for the known keys (any other
//! `NIXFLEET_*` variable is ignored).

use crate::config::keys::{Env, KEYS, env_name};
use crate::config::layer::{Layer, LayerKind};

/// `NIXFLEET_<KEY>` for the known keys only.
pub(crate) fn env_layer(env: Env<'_>) -> Layer {
    let mut layer = Layer::new(LayerKind::Env);
    for key in KEYS {
        if let Some(value) = env(&env_name(key)) {
            layer.set(key, value);
        }
    }
    layer
}
