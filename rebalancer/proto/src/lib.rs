//! Wire protocol and shared models.
