//! `hostile-llm`: serves the faulty provider of [`mgo_dev::hostile_llm`] on 127.0.0.1 until
//! stopped, for `hack/hostile_rss.py`. Prints its base URL on the first line.

use clap::Parser;
use mgo_dev::hostile_llm::HostileLlm;

/// An OpenAI-compatible chat API that answers by the last message's text: `huge-answer`,
/// `endless-line`, `silent-after-first`, or a normal small answer for any other text.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Bytes of the huge answer and of the endless line.
    #[arg(long, default_value_t = 300 * 1024 * 1024)]
    size: usize,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let fake = HostileLlm::start(args.size).await;
    println!("{}", fake.url);
    std::future::pending::<()>().await;
}
