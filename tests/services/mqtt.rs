//! mqtt (in progress)
