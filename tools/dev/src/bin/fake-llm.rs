//! `fake-llm`: serves one fake LLM provider ([`mgo_dev::fake_llm`]) on 127.0.0.1 (or the address
//! given: the demo's real pods reach it on the local stack's bridge) until stopped, for the demo,
//! for trying the gateway by hand and for the delivery benchmark (which needs an upstream with a
//! realistic latency: `--delay-ms`). Prints its base URL on the first line.

use std::time::Duration;

use clap::Parser;
use mgo_dev::fake_llm::FakeLlm;

/// A local fake of the OpenAI, Azure OpenAI, Anthropic and Gemini APIs (their wire formats, their
/// credential headers), answering `reply from NAME to: <the last user message>` with usage.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to listen on: 127.0.0.1, or one pods reach (the local stack's bridge).
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port (0: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The only API key it accepts.
    #[arg(long)]
    api_key: String,
    /// Its name in every answer.
    #[arg(long, default_value = "fake-llm")]
    name: String,
    /// Every answer waits this long (ms) before its status line, as a real model would.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let addr = std::net::SocketAddr::new(args.host, args.port);
    let fake = FakeLlm::start_on(addr, &args.name, &args.api_key).await;
    // Nothing outside this process can read the recorded requests: recording would only cost.
    fake.set_recording(false);
    fake.set_delay(Duration::from_millis(args.delay_ms));
    println!("{}", fake.url);
    // Runs until a signal ends the process (the demo stops it with SIGTERM).
    std::future::pending::<()>().await;
}
