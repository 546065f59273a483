//! The enrollment client's one HTTPS client (`komnet_enroll_client::Client`) against the real
//! service on loopback, with a TCP relay in between that counts the connections the client
//! opens and can cut them all, as the service does when it closes idle connections: polls reuse
//! one connection, a cut one is replaced without the caller seeing it, a `POST` never rides on a
//! kept connection, and an unreachable first URL is not tried again while the kept connection
//! to the second lives.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use komnet_enroll::client::{self, Client, PolicyFetch};
use komnet_enroll::identity::Role;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use common::{enroll, PolicyFixture};

/// A TCP relay to the service that counts connections and can cut them.
struct Relay {
    url: String,
    accepted: Arc<AtomicU64>,
    pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let accepted = Arc::new(AtomicU64::new(0));
        let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let task = tokio::spawn({
            let accepted = accepted.clone();
            let pipes = pipes.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    pipes.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(to).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }));
                }
            }
        });
        Relay {
            url,
            accepted,
            pipes,
            task,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every relayed connection, as a service closing its idle connections.
    fn cut_all(&self) {
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut_all();
        self.task.abort();
    }
}

/// How many calls the before/after comparison makes.
const CALLS: u64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_reuse_one_connection_where_one_shot_calls_open_one_each() {
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    h.service
        .publish_policy(&fixture.bundle(7), "test")
        .unwrap();
    let (mut spoke, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    let relay = Relay::start(h.server.addr).await;
    spoke.enroll_urls = vec![relay.url.clone()];

    // Before: a call, a connection (TCP and TLS with a client certificate).
    for i in 0..CALLS {
        if i % 2 == 0 {
            assert_eq!(
                client::fetch_policy(&spoke, Some(7)).await.unwrap(),
                PolicyFetch::NotModified
            );
        } else {
            assert_eq!(client::fetch_hubs(&spoke).await.unwrap(), vec![]);
        }
    }
    let one_shot = relay.accepted();
    assert_eq!(one_shot, CALLS);

    // After: the same calls through one client, one connection.
    let client = Client::for_enrollment(&spoke).unwrap();
    for i in 0..CALLS {
        if i % 2 == 0 {
            assert_eq!(
                client.fetch_policy(Some(7)).await.unwrap(),
                PolicyFetch::NotModified
            );
        } else {
            assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
        }
    }
    // A whole bundle and a refusal (a typed error read to its end) keep the connection too.
    match client.fetch_policy(None).await.unwrap() {
        PolicyFetch::Bundle { version, .. } => assert_eq!(version, 7),
        other => panic!("expected the bundle, got {other:?}"),
    }
    let refused = client.registry_snapshot().await.unwrap_err();
    assert!(refused.api_error().is_some(), "{refused}");
    assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
    let pooled = relay.accepted() - one_shot;
    assert_eq!(pooled, 1, "{CALLS} + 3 calls through one client");
    assert_eq!(client.connections_opened(), 1);
    eprintln!("connections for {CALLS} calls: one-shot {one_shot}, one client {pooled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_service_closed_is_replaced_unseen() {
    let fixture = PolicyFixture::new();
    let h = common::start_with_policy_key(&fixture).await;
    let (mut spoke, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    let relay = Relay::start(h.server.addr).await;
    spoke.enroll_urls = vec![relay.url.clone()];
    let client = Client::for_enrollment(&spoke).unwrap();

    for round in 1..=5u64 {
        assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
        assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
        assert_eq!(client.connections_opened(), round);
        relay.cut_all();
        if round % 2 == 0 {
            // Give the client's connection task time to see the close first: the kept
            // connection is then known to be closed before the next call; otherwise the call
            // finds out while sending and goes again over a new connection.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert_eq!(relay.accepted(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_never_rides_on_a_kept_connection() {
    let h = common::start().await;
    let (mut spoke, keys) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    let relay = Relay::start(h.server.addr).await;
    spoke.enroll_urls = vec![relay.url.clone()];
    let client = Client::for_enrollment(&spoke).unwrap();
    assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
    // Renewal is allowed from 2/3 of the lifetime on.
    h.clock.advance(h.lifetime() * 2 / 3 + 1);
    let renewed = client.renew(&spoke, &keys).await.unwrap();
    assert!(renewed.identity.not_after > spoke.identity.not_after);
    assert_eq!(client.connections_opened(), 2);
    assert_eq!(relay.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_first_url_is_skipped_once_then_the_kept_connection_serves() {
    let h = common::start().await;
    let (mut spoke, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    // A port nothing listens on: bound, then closed.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let relay = Relay::start(h.server.addr).await;
    spoke.enroll_urls = vec![dead, relay.url.clone()];
    let client = Client::for_enrollment(&spoke).unwrap();
    for _ in 0..5 {
        assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
    }
    assert_eq!(client.connections_opened(), 1);
    assert_eq!(relay.accepted(), 1);
}

/// The service closes a connection that stays idle for its `client_timeout` (hyper's header
/// timeout counts from the end of the last answer): the client notices and the next call opens a
/// new connection, without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_past_the_service_timeout_is_replaced() {
    let h = common::start_with(common::short_timeout_config(1)).await;
    let (spoke, _) = enroll(&h, "musterstadt", "rathaus", Role::Spoke).await;
    let client = Client::for_enrollment(&spoke).unwrap();
    assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
    assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
    assert_eq!(client.connections_opened(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(client.fetch_hubs().await.unwrap(), vec![]);
    assert_eq!(client.connections_opened(), 2);
}
