fn main() -> anyhow::Result<()> {
    configserver::config::main()
}
