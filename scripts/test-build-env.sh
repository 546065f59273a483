# test-build-env.sh — how the README's test command builds (sourced by scripts/test.sh and
# .ci/run, not run). The tests run the same code as the release, built without cross-crate
# LTO and with line tables only: thin LTO re-optimises every dependency for each of the ~60
# test executables (one small test binary took 65 s to link), which made the build most of
# CI's time. The build goes to its own target directory, so target/release (demo, benches,
# packages) keeps its LTO build and neither command rebuilds the other's.
# CARGO_TARGET_DIR, if already set, is kept; the tests find the daemons through it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/test}"
export CARGO_PROFILE_RELEASE_LTO=false
export CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
