//! Test support for komnet's end-to-end tests in network namespaces.
