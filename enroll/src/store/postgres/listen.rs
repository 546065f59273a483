//! The registry listener: hands every committed registry event — this replica's and every other
//! replica's — to this replica's watchers, in version order, each once.
//!
//! One connection of its own LISTENs on [`CHANNEL`]; a notification (sent by a commit that
//! appended events) or a poll every [`POLL`] reads the versions above the last one published.
//! Versions commit in order (the registry lock in `txn.rs`), so "above the last one" never
//! skips one that commits late. A lost connection is made again, with backoff, and the read
//! from the last published version covers whatever was committed meanwhile.

use std::time::Duration;

use tokio_postgres::AsyncMessage;

use super::*;

/// The backstop for a lost notification, and the check that the connection still answers.
const POLL: Duration = Duration::from_secs(1);
/// A read that takes longer means a dead connection (a half-open TCP connection says nothing).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Runs until the store's runtime shuts down.
pub(super) async fn run(
    config: tokio_postgres::Config,
    transport: Transport,
    events: broadcast::Sender<Arc<RegistryEvent>>,
    mut last: u64,
    database: String,
) {
    let mut backoff = BACKOFF_FIRST;
    loop {
        let started = tokio::time::Instant::now();
        let e = match &transport {
            Transport::Plain => connect_and_follow(&config, NoTls, &events, &mut last).await,
            Transport::Verified(tls) => {
                connect_and_follow(&config, tls.clone(), &events, &mut last).await
            }
        };
        tracing::warn!(
            error = %e,
            database = %database,
            last_version = last,
            "registry listener lost its database connection; connecting again"
        );
        if started.elapsed() > BACKOFF_MAX * 2 {
            backoff = BACKOFF_FIRST;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Connects through `tls`, then [`follow`]s; returns why it stopped (a failed connection with
/// its causes: which certificate was refused, and why).
async fn connect_and_follow<T>(
    config: &tokio_postgres::Config,
    tls: T,
    events: &broadcast::Sender<Arc<RegistryEvent>>,
    last: &mut u64,
) -> StoreError
where
    T: tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket>,
    T::Stream: Send + 'static,
{
    match config.connect(tls).await {
        Ok((client, connection)) => follow(client, connection, events, last).await,
        Err(e) => StoreError::Connect {
            database: "registry listener".into(),
            message: with_causes(&e),
        },
    }
}

/// Listens and publishes until the connection fails; returns why.
async fn follow<S, T>(
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<S, T>,
    events: &broadcast::Sender<Arc<RegistryEvent>>,
    last: &mut u64,
) -> StoreError
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (notified, mut notifications) = tokio::sync::mpsc::unbounded_channel::<()>();
    // The connection's messages: replies go to `client`, notifications come out here.
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    let _ = notified.send(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return StoreError::from(e),
                None => {
                    return StoreError::Connect {
                        database: "registry listener".into(),
                        message: "the server closed the connection".into(),
                    }
                }
            }
        }
    });
    let result = async {
        client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        loop {
            // First round: whatever was committed while this replica did not listen.
            publish_new(&client, events, last).await?;
            tokio::select! {
                n = notifications.recv() => {
                    if n.is_none() {
                        return Ok(());
                    }
                    // One read covers every notification that has queued up meanwhile.
                    while notifications.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
    .await;
    match result {
        Err(e) => {
            driver.abort();
            e
        }
        Ok(()) => driver
            .await
            .unwrap_or_else(|e| StoreError::Thread(e.to_string())),
    }
}

/// Publishes the events above `last`, in order.
async fn publish_new(
    client: &tokio_postgres::Client,
    events: &broadcast::Sender<Arc<RegistryEvent>>,
    last: &mut u64,
) -> Result<(), StoreError> {
    loop {
        let rows = tokio::time::timeout(READ_TIMEOUT, events_since(client, *last, 1000))
            .await
            .map_err(|_| StoreError::Connect {
                database: "registry listener".into(),
                message: format!("no answer within {}s", READ_TIMEOUT.as_secs()),
            })??;
        let n = rows.len();
        for row in rows {
            let version = row.0 as u64;
            match to_event(row) {
                Ok(event) => {
                    let _ = events.send(Arc::new(event));
                }
                // Watchers that need it read it from the store, and say so there.
                Err(e) => tracing::error!(error = %e, version, "registry event not published"),
            }
            *last = version;
        }
        if n < 1000 {
            return Ok(());
        }
    }
}
