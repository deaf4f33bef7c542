//! Shared by the benches in `benches/` and the `intervm-bench` harness:
//! the runs themselves ([`runs`]) and a `main` that runs criterion and then
//! a bench's own summary table.

pub mod runs;

/// Runs the criterion groups in `benches`, then `summary` (unless criterion
/// was only asked to list or smoke-test the benches).
pub fn main_with_summary(benches: fn(), summary: fn()) {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
    if !std::env::args().any(|a| a == "--list" || a == "--test") {
        summary();
    }
}
