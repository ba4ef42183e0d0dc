//! The Smaregi client against the simulator over real HTTP(S): every call,
//! and every class of failure.

use std::time::Duration;

use smaregi_relay::smaregi::api::{CallError, Class};
use smaregi_relay::smaregi::client::SmaregiClient;
use smaregi_relay::smaregi::sale::{Sale, SaleLine};
use smaregi_sim::{Faults, SimConfig, Simulator};

mod common;
use common::smaregi::{relay_config, simulator, ACCESS_TOKEN, CONTRACT_ID, TERMINAL};

fn sale(terminal_tran_id: &str) -> Sale {
    Sale {
        store_id: "1".into(),
        terminal_id: TERMINAL.into(),
        terminal_tran_id: terminal_tran_id.into(),
        terminal_tran_date_time: smaregi_relay::smaregi::jst::format(
            smaregi_relay::smaregi::jst::now(),
        ),
        lines: vec![SaleLine {
            product_id: Some("113".into()),
            product_code: Some("4901234567894".into()),
            product_name: Some("緑茶 500ml".into()),
            sales_price: 150,
            quantity: 2,
            returned: false,
        }],
        discount: 0,
        tax_exclude: 0,
        carriage: 500,
        commission: 0,
        customer_id: None,
        memo: None,
        dispose_of: None,
        tax_include: 0,
        sum_division: 2,
        payment: None,
    }
}

struct Setup {
    _temp: tempfile::TempDir,
    client: SmaregiClient,
}

fn client_for(url: &str, extra: &str) -> Setup {
    let temp = tempfile::tempdir().unwrap();
    let config = relay_config(temp.path(), url, extra);
    let client = SmaregiClient::new(config.smaregi.as_ref().unwrap()).unwrap();
    Setup {
        _temp: temp,
        client,
    }
}

#[tokio::test]
async fn registers_finds_and_reads_stock() {
    let sim = simulator().await;
    let setup = client_for(&sim.url(), "");
    sim.with_contract(|c| c.set_stock("1", "113", 10, 0));

    let sale = sale("1");
    let id = setup.client.register(&sale).await.unwrap();
    let stored = &sim.contract().transactions[&id];
    assert_eq!(stored.field("terminalTranId"), Some("1"));
    assert_eq!(stored.field("total"), Some("800"));
    assert_eq!(setup.client.find_registered(&sale).await.unwrap(), Some(id));
    assert_eq!(
        setup
            .client
            .find_registered(&self::sale("2"))
            .await
            .unwrap(),
        None
    );

    // A reversal points at its original and puts the stock back.
    let mut reversal = sale.reversal("2", &sale.terminal_tran_date_time);
    reversal.dispose_of = Some(id);
    let reversal_id = setup.client.register(&reversal).await.unwrap();
    let stored = &sim.contract().transactions[&reversal_id];
    assert_eq!(
        stored.field("disposeServerTransactionHeadId"),
        Some(id.to_string().as_str())
    );
    assert_eq!(stored.field("total"), Some("-800"));

    // 2,500 products: three calls of at most 1,000; products without a row have none.
    let products: Vec<String> = (1..=2500).map(|n| n.to_string()).collect();
    sim.with_contract(|c| {
        for n in (1..=2500).step_by(2) {
            c.set_stock("1", &n.to_string(), n, 0);
        }
        c.set_stock("2", "1", 99, 0);
    });
    let calls_before = sim.stats().calls;
    let stock = setup.client.stock("1", &products).await.unwrap();
    assert_eq!(sim.stats().calls - calls_before, 3);
    assert_eq!(
        stock.len(),
        1250,
        "the odd products have rows, the even none"
    );
    let first = stock.iter().find(|row| row.product_id == "1").unwrap();
    assert_eq!((first.store_id.as_str(), first.amount), ("1", 1));
    let sold = stock.iter().find(|row| row.product_id == "113").unwrap();
    assert_eq!(sold.amount, 113, "as set after the sale and its reversal");
    sim.stop().await;
}

/// A call's error, from a register (write) or a look-up (read).
async fn register_error(setup: &Setup) -> CallError {
    setup.client.register(&sale("99")).await.unwrap_err()
}

#[tokio::test]
async fn credentials_and_settings_errors_pause_the_upstream() {
    let wrong_token = Simulator::start(SimConfig::local(CONTRACT_ID, "another-token"))
        .await
        .unwrap();
    let setup = client_for(&wrong_token.url(), "");
    let error = register_error(&setup).await;
    assert!(matches!(error, CallError::Api { code: 13, .. }), "{error}");
    assert_eq!(error.class(true), Class::Configuration);
    assert!(!error.to_string().contains(ACCESS_TOKEN));
    wrong_token.stop().await;

    let wrong_contract = Simulator::start(SimConfig::local("another_contract", ACCESS_TOKEN))
        .await
        .unwrap();
    let setup = client_for(&wrong_contract.url(), "");
    let error = register_error(&setup).await;
    assert!(matches!(error, CallError::Api { code: 14, .. }), "{error}");
    assert_eq!(error.class(true), Class::Configuration);
    wrong_contract.stop().await;

    let sim = simulator().await;
    sim.set_faults(Faults {
        disabled: vec!["transaction_upd".into()],
        ..Faults::default()
    });
    let setup = client_for(&sim.url(), "");
    let error = register_error(&setup).await;
    assert!(matches!(error, CallError::Api { code: 23, .. }), "{error}");
    assert_eq!(error.class(true), Class::Configuration);
    sim.stop().await;
}

#[tokio::test]
async fn a_validation_error_is_permanent_with_smaregis_message() {
    let sim = simulator().await;
    let setup = client_for(&sim.url(), "");
    let error = setup
        .client
        .register(&sale("12345678901"))
        .await
        .unwrap_err();
    let CallError::Api {
        code: 41, message, ..
    } = &error
    else {
        panic!("{error}");
    };
    assert!(message.contains("terminalTranId"), "{message}");
    assert_eq!(error.class(true), Class::Permanent);
    assert!(sim.contract().transactions.is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn unknown_outcomes_are_ambiguous_for_writes_and_retryable_for_reads() {
    let sim = simulator().await;
    let setup = client_for(&sim.url(), "request-timeout-seconds = 1");
    let cases = [
        (
            "a 500",
            Faults {
                error_rate: 1.0,
                ..Faults::default()
            },
        ),
        (
            "a reset",
            Faults {
                reset_rate: 1.0,
                ..Faults::default()
            },
        ),
        (
            "a hang",
            Faults {
                hang_rate: 1.0,
                hang_ms: 5_000,
                ..Faults::default()
            },
        ),
        (
            "a malformed answer",
            Faults {
                malformed_rate: 1.0,
                ..Faults::default()
            },
        ),
    ];
    for (what, faults) in cases {
        sim.set_faults(faults);
        let write = register_error(&setup).await;
        assert!(
            matches!(write.class(true), Class::Ambiguous { .. }),
            "{what}: {write:?}"
        );
        let read = setup.client.find_registered(&sale("99")).await.unwrap_err();
        assert!(
            matches!(read.class(false), Class::Retryable { .. }),
            "{what}: {read:?}"
        );
        if what == "a hang" {
            assert_eq!(write, CallError::Timeout);
        }
    }

    // Maintenance: 503 for a while.
    sim.set_faults(Faults::default());
    sim.start_maintenance(Duration::from_secs(3600));
    let error = register_error(&setup).await;
    assert!(
        matches!(error, CallError::Status { status: 503, .. }),
        "{error}"
    );
    assert!(matches!(error.class(true), Class::Ambiguous { .. }));
    sim.stop().await;
}

#[tokio::test]
async fn a_write_that_took_effect_before_failing_is_found_by_its_look_up() {
    let sim = simulator().await;
    let setup = client_for(&sim.url(), "");
    sim.set_faults(Faults {
        commit_then_fail_rate: 1.0,
        ..Faults::default()
    });
    let sale = sale("7");
    let error = setup.client.register(&sale).await.unwrap_err();
    assert!(
        matches!(error.class(true), Class::Ambiguous { .. }),
        "{error:?}"
    );
    sim.set_faults(Faults::default());
    let found = setup.client.find_registered(&sale).await.unwrap();
    let stored: Vec<u64> = sim.contract().transactions.keys().copied().collect();
    assert_eq!(found.map(|id| vec![id]), Some(stored));
    sim.stop().await;
}

#[tokio::test]
async fn a_rate_limit_is_retried_after_smaregis_retry_after() {
    // A bucket of one call that refills in 100 s: the second call is
    // refused however slowly the machine makes it.
    let sim = Simulator::start(SimConfig {
        rate_limit_per_second: 0.01,
        ..SimConfig::local(CONTRACT_ID, ACCESS_TOKEN)
    })
    .await
    .unwrap();
    let setup = client_for(&sim.url(), "");
    setup.client.find_registered(&sale("1")).await.unwrap();
    let error = setup.client.find_registered(&sale("1")).await.unwrap_err();
    assert_eq!(
        error.class(false),
        Class::Retryable {
            retry_after: Some(Duration::from_secs(1))
        },
        "{error}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error_never_ambiguous() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/access/", closed.local_addr().unwrap());
    drop(closed);
    let setup = client_for(&url, "");
    let error = register_error(&setup).await;
    assert!(matches!(error, CallError::Connect(_)), "{error}");
    assert_eq!(error.class(true), Class::Retryable { retry_after: None });
}

#[tokio::test]
async fn https_with_a_trusted_certificate_works_and_an_untrusted_one_does_not() {
    let temp = tempfile::tempdir().unwrap();
    let certified =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert = common::write_file(temp.path(), "sim.pem", &certified.cert.pem(), 0o644);
    let key = common::write_file(
        temp.path(),
        "sim.key",
        &certified.signing_key.serialize_pem(),
        0o600,
    );
    let sim = Simulator::start(SimConfig {
        tls: Some((cert.clone(), key)),
        ..SimConfig::local(CONTRACT_ID, ACCESS_TOKEN)
    })
    .await
    .unwrap();
    assert!(sim.url().starts_with("https://127.0.0.1:"));

    let trusting = client_for(&sim.url(), &format!("ca-file = \"{}\"", cert.display()));
    trusting.client.register(&sale("1")).await.unwrap();
    let untrusting = client_for(&sim.url(), "");
    let error = register_error(&untrusting).await;
    assert!(
        error.to_string().to_lowercase().contains("certificate"),
        "{error}"
    );
    assert_eq!(sim.contract().transactions.len(), 1);
    sim.stop().await;
}
