/// jemalloc: glibc's malloc costs the registry's many small per-entry
/// allocations, made and freed on different worker threads, far more CPU
/// (see docs/PERFORMANCE.md); memory per session stays as low.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    configserver::config::main()
}
