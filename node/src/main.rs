use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = edgesync_node::cli::Cli::parse();
    edgesync_node::telemetry::init(cli.log_format);
    edgesync_node::cli::run(cli)
}
