//! nats (in progress)
