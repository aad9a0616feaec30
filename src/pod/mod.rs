//! Pod checkpoints (KEP-5823): `CheckpointPod` takes one consistent cut of
//! several containers of a pod, `RestorePod` brings them back into a new
//! sandbox. Both compose the single-container steps: a pod checkpoint is one
//! of today's archives per container plus a [`manifest`], and a pod restore
//! creates each container through today's restore path.
//!
//! - [`options`]: the keys a caller may set, checked before anything runs;
//! - [`output`]: the checkpoint's directory, and its atomic commit;
//! - [`manifest`]: what the checkpoint records of the pod and its containers;
//! - [`checkpoint`]: freeze every container, dump each, thaw all, archive;
//! - [`restore`]: the checks of a restore request against the checkpoint.

pub mod checkpoint;
pub mod manifest;
pub mod options;
pub mod output;
pub mod restore;

use std::time::Duration;

/// The budget of a call that brings no deadline of its own.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
