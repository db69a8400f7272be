//! Policies and planner.
