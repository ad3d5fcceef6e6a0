//! `embed-worker search TEXT [-k N] [--filter EXPR]`, printing the docs page's lines:
//! `ID: doc:0, Distance:0.114169843495, Content:'That is a very happy person'`.

use std::process::ExitCode;

use crate::model::Model;
use crate::settings::Settings;
use crate::store::query;
use crate::store::Store;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Query text.
    pub text: String,
    /// Number of neighbours.
    #[arg(short, default_value_t = 3)]
    pub k: usize,
    /// Pre-filter in query syntax, e.g. '@genre:{pets}'.
    #[arg(long)]
    pub filter: Option<String>,
}

pub fn execute(settings: Settings, args: Args) -> anyhow::Result<ExitCode> {
    let model = Model::load(&settings)?;
    let vector = model
        .embed_texts_blocking(&[args.text.as_str()])?
        .pop()
        .expect("one text in, one vector out");
    let store = Store::new(&settings.redis)?;
    let text_field = settings.stream.text_field.clone();
    let hits = super::runtime()?.block_on(async {
        let mut conn = store.connect().await?;
        query::knn(
            &mut conn,
            &settings.index.name,
            &settings.index.vector_field,
            &vector,
            args.k,
            args.filter.as_deref(),
            &[text_field.as_str()],
        )
        .await
        .map_err(|e| anyhow::Error::from(store.error(e)))
    })?;
    for hit in hits {
        println!(
            "ID: {}, Distance:{}, Content:'{}'",
            hit.key,
            hit.distance,
            hit.field(&text_field).unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}
