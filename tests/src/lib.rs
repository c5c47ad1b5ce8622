//! Helpers for the end-to-end tests: network namespaces, cgroups, the agent under test.
