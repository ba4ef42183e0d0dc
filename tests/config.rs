//! Loading configs from real files, through the library and through
//! `smaregi-relay check-config`.

mod common;

use std::path::Path;

use common::{run_relay, write_config, write_file, INTAKE_SECRET};
use smaregi_relay::config::{self, ConfigError, SecretEnvironment, Severity};
use smaregi_relay::exit;

/// The example shipped in the package, byte for byte.
const EXAMPLE: &str = include_str!("../packaging/config.example.toml");

fn check_config(path: &Path) -> (i32, String, String) {
    run_relay(&["check-config", "--config", path.to_str().unwrap()], &[])
}

fn errors_of(result: Result<config::LoadedConfig, ConfigError>) -> Vec<String> {
    match result {
        Err(ConfigError::Invalid(diagnostics)) => {
            diagnostics.0.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected an invalid config, got {other:?}"),
    }
}

#[test]
fn the_packaged_example_is_valid_as_installed() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_file(temp.path(), "config.toml", EXAMPLE, 0o640);
    write_file(
        temp.path(),
        "intake-secret",
        &format!("{INTAKE_SECRET}\n"),
        0o640,
    );

    let (code, stdout, stderr) = check_config(&path);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "ok\n", ""));

    let loaded = config::load(&path).unwrap();
    let config = &loaded.config;
    assert_eq!(config.intake.secret.expose(), INTAKE_SECRET);
    assert_eq!(config.listener.address, config::defaults::LISTEN_ADDRESS);
    assert_eq!(
        config.storage.cache_capacity_mib,
        config::defaults::CACHE_CAPACITY_MIB
    );
    assert!(
        config.smaregi.is_none(),
        "Smaregi is not configured until the operator fills it in"
    );
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn every_documented_key_of_the_example_is_accepted_when_uncommented() {
    // Uncommenting `# key = value` lines must give a valid config: the
    // example documents only real keys, with valid values.
    let temp = tempfile::tempdir().unwrap();
    let uncommented: String = EXAMPLE
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            // The certificate paths name files on the operator's machine.
            Some(rest) if rest.starts_with("tls-") => line,
            Some(rest) if is_key_line(rest) || (rest.starts_with('[') && rest.ends_with(']')) => {
                rest
            }
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let path = write_file(temp.path(), "config.toml", &uncommented, 0o640);
    write_file(temp.path(), "intake-secret", INTAKE_SECRET, 0o600);
    write_file(
        temp.path(),
        "smaregi-access-token",
        "token-0123456789abcdef",
        0o600,
    );
    write_file(
        temp.path(),
        "orders-api-token",
        "orders-0123456789abcdef",
        0o600,
    );
    write_file(
        temp.path(),
        "stock-api-token",
        "stock-0123456789abcdef",
        0o600,
    );
    write_file(
        temp.path(),
        "downstream-secret",
        "downstream-0123456789abcdef",
        0o600,
    );
    write_file(
        temp.path(),
        "downstream-ca.pem",
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        0o644,
    );
    write_file(
        temp.path(),
        "status-token",
        "status-0123456789abcdef",
        0o600,
    );
    write_file(
        temp.path(),
        "proxy-ca.pem",
        "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        0o644,
    );
    write_file(
        temp.path(),
        "alerts-webhook-secret",
        "alerts-0123456789abcdef",
        0o600,
    );
    write_file(temp.path(), "smtp-password", "smtp pass", 0o600);
    for ca in ["alerts-webhook-ca.pem", "smtp-ca.pem"] {
        write_file(
            temp.path(),
            ca,
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
            0o644,
        );
    }
    let loaded = config::load(&path).unwrap_or_else(|e| panic!("{e}\n---\n{uncommented}"));
    let smaregi = loaded
        .config
        .smaregi
        .as_ref()
        .expect("[smaregi] was uncommented");
    assert_eq!(smaregi.access_token.expose(), "token-0123456789abcdef");
    assert_eq!(smaregi.terminal_id, "9");
    assert_eq!(
        smaregi.ca_file.as_deref(),
        Some(temp.path().join("proxy-ca.pem").as_path())
    );
    assert_eq!(loaded.config.stock.stores, ["1", "2"]);
    let downstream = loaded
        .config
        .stock
        .downstream
        .as_ref()
        .expect("uncommented");
    assert_eq!(downstream.secret.expose(), "downstream-0123456789abcdef");
    assert_eq!(
        loaded.config.orders.payment_methods.get("credit-card"),
        Some(&config::PaymentKind::Credit)
    );
    let alerts = &loaded.config.alerts;
    let webhook = alerts.webhook.as_ref().expect("uncommented");
    assert_eq!(webhook.secret.expose(), "alerts-0123456789abcdef");
    let email = alerts.email.as_ref().expect("uncommented");
    assert_eq!(
        email.password.as_ref().map(|p| p.expose()),
        Some("smtp pass")
    );
    assert_eq!(email.to.len(), 2);
    assert_eq!(email.port(), 465);
    assert_eq!(
        email.ca_file.as_deref(),
        Some(temp.path().join("smtp-ca.pem").as_path())
    );
}

#[test]
fn alert_settings_that_cannot_work_are_errors_at_their_keys() {
    let temp = tempfile::tempdir().unwrap();
    write_file(temp.path(), "short-secret", "short", 0o600);
    let path = write_config(
        temp.path(),
        "[alerts]\ndigest-interval-minutes = 0\n\n\
         [alerts.webhook]\nurl = \"http://hooks.example.com/alerts\"\n\
         secret = { file = \"short-secret\" }\n\n\
         [alerts.email]\nsmtp-host = \"smtps://smtp.example.com\"\ntls = \"none\"\n\
         from = \"relay\"\nto = []\n",
    );
    let errors = errors_of(config::load(&path));
    // `tls = "none"` stops the section at its first structural error.
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains(":16:7: unknown variant `none`, expected `wrapper` or `starttls`"),
        "{errors:#?}"
    );

    let path = write_config(
        temp.path(),
        "[alerts]\ndigest-interval-minutes = 0\n\n\
         [alerts.webhook]\nurl = \"http://hooks.example.com/alerts\"\n\
         secret = { file = \"short-secret\" }\n\n\
         [alerts.email]\nsmtp-host = \"smtps://smtp.example.com\"\nusername = \"relay\"\n\
         from = \"relay\"\nto = []\n",
    );
    let errors = errors_of(config::load(&path));
    let expected = [
        ":8:27: 0 is out of range: use 1 to 1440 (a day)",
        ":11:7: `http://hooks.example.com/alerts` is not an https:// URL",
        ":12:10: `secret` is 5 characters long",
        ":15:13: `smtps://smtp.example.com` is not a host name or IP address",
        ":16:12: `username` is set but `password` is not",
        ":17:8: `relay` is not an e-mail address",
        ":18:6: names no recipient",
    ];
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    for (error, expected) in errors.iter().zip(expected) {
        assert!(error.contains(expected), "{error} does not say {expected}");
    }
}

#[test]
fn order_settings_that_cannot_work_are_errors_at_their_keys() {
    let temp = tempfile::tempdir().unwrap();
    write_file(
        temp.path(),
        "orders-token",
        "orders-0123456789abcdef",
        0o600,
    );
    let path = write_config(
        temp.path(),
        "[orders]\napi-token = { file = \"orders-token\" }\nunmapped = \"dummy-product\"\n\
         sum-division = 7\n[orders.payment-methods]\ncard = \"cheque\"\n",
    );
    let errors = errors_of(config::load(&path));
    // The payment method's type error stops the section; fix it and look again.
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("cheque"), "{errors:?}");
    let path = write_config(
        temp.path(),
        "[orders]\napi-token = { file = \"orders-token\" }\nunmapped = \"dummy-product\"\n\
         sum-division = 7\n",
    );
    let errors = errors_of(config::load(&path));
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(errors[0].contains(":8:1: the order API"), "{errors:?}");
    assert!(
        errors[1].contains(":9:") && errors[1].contains("dummy-product-id"),
        "{errors:?}"
    );
    assert!(
        errors[2].contains(":10:") && errors[2].contains("sumDivision"),
        "{errors:?}"
    );
}

#[test]
fn a_status_page_on_the_network_needs_a_token_and_hours_must_be_times() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_config(
        temp.path(),
        "[admin]\nlisten = \"0.0.0.0:9187\"\nopening-hours = \"10時-20時\"\n\
         control-socket = \"control.sock\"\n",
    );
    let errors = errors_of(config::load(&path));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains(":8:") && errors[0].contains("status-token"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains(":9:") && errors[1].contains("HH:MM"),
        "{errors:?}"
    );
    write_file(
        temp.path(),
        "status-token",
        "status-0123456789abcdef",
        0o600,
    );
    let path = write_config(
        temp.path(),
        "[admin]\nlisten = \"0.0.0.0:9187\"\nstatus-token = { file = \"status-token\" }\n\
         control-socket = \"control.sock\"\n",
    );
    let loaded = config::load(&path).unwrap();
    assert_eq!(
        loaded.config.admin.status_token.unwrap().expose(),
        "status-0123456789abcdef"
    );
}

/// `key = value` with a kebab-case key at the start of the line.
fn is_key_line(line: &str) -> bool {
    line.split_once(" = ").is_some_and(|(key, _)| {
        !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
    })
}

#[test]
fn an_unknown_key_is_reported_with_its_line_and_column_and_exit_78() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_config(temp.path(), "[listener]\nadress = \"0.0.0.0:1\"\n");
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, i32::from(exit::CONFIG));
    assert_eq!(stdout, "");
    let expected = format!(
        "{}:8:1: unknown field `adress`, expected one of `address`, `tls-certificate`, `tls-private-key`, \
         `max-connections`, `handshake-timeout-seconds`, `header-timeout-seconds`, `body-timeout-seconds`\n",
        path.display()
    );
    assert_eq!(stderr, expected);
}

#[test]
fn a_wrong_type_is_reported_at_the_value() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_config(temp.path(), "[storage]\n");
    let text = format!(
        "[storage]\ncache-capacity-mib = \"big\"\n\n[intake]\nsecret = \"{INTAKE_SECRET}\"\n"
    );
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, i32::from(exit::CONFIG));
    assert_eq!(
        stderr,
        format!(
            "{}:2:22: invalid type: string \"big\", expected u64\n",
            path.display()
        )
    );
}

#[test]
fn every_problem_is_reported_in_one_run_in_file_order() {
    let temp = tempfile::tempdir().unwrap();
    let text = "\
[listener]
tls-certificate = \"cert.pem\"

[bogus]

[intake]
secret = \"short\"
notify-path = \"no-slash\"

[stock]
stores = [\"12\", \"abc\"]

[outbox]
workers = \"many\"
";
    let path = write_file(temp.path(), "config.toml", text, 0o600);
    let errors = errors_of(config::load(&path));
    let locations: Vec<_> = errors
        .iter()
        .map(|e| {
            e.trim_start_matches(&format!("{}:", path.display()))
                .split(": ")
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        locations,
        ["2:19", "2:19", "4:2", "7:10", "8:15", "11:10", "14:11"],
        "{errors:#?}"
    );
    assert!(errors[0].contains("`tls-private-key` is not"));
    assert!(errors[1].contains("cert.pem") && errors[1].contains("No such file"));
    assert!(errors[2].contains("unknown section `bogus`"));
    assert!(errors[3].contains("use at least 16"));
    assert!(errors[4].contains("not a URL path"));
    assert!(errors[5].contains("`abc` is not a store id"));
    assert!(errors[6].contains("invalid type"));
}

#[test]
fn tls_files_must_exist_and_a_readable_private_key_is_warned_about() {
    let temp = tempfile::tempdir().unwrap();
    let tls = "[listener]\ntls-certificate = \"cert.pem\"\ntls-private-key = \"key.pem\"\n";
    let path = write_config(temp.path(), tls);
    let errors = errors_of(config::load(&path));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("cert.pem") && errors[1].contains("key.pem"),
        "{errors:?}"
    );

    write_file(temp.path(), "cert.pem", "certificate", 0o644);
    write_file(temp.path(), "key.pem", "private key", 0o644);
    let warnings = config::load(&path).unwrap().warnings;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].message.contains("key.pem holds a private key"),
        "{warnings:?}"
    );

    write_file(temp.path(), "key.pem", "private key", 0o640);
    let loaded = config::load(&path).unwrap();
    assert!(loaded.warnings.is_empty());
    assert_eq!(
        loaded.config.listener.tls_private_key,
        Some(temp.path().join("key.pem"))
    );
}

#[test]
fn toml_syntax_errors_have_locations() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_file(temp.path(), "config.toml", "[intake]\nsecret = \n", 0o600);
    let errors = errors_of(config::load(&path));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!("{}:2:", path.display())),
        "{errors:?}"
    );
}

#[test]
fn a_missing_intake_section_is_an_error() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_file(
        temp.path(),
        "config.toml",
        "[logging]\nlevel = \"debug\"\n",
        0o600,
    );
    let errors = errors_of(config::load(&path));
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("missing section `[intake]`"),
        "{errors:?}"
    );
}

#[test]
fn a_missing_file_exits_66() {
    let temp = tempfile::tempdir().unwrap();
    let missing = temp.path().join("absent.toml");
    let (code, stdout, stderr) = check_config(&missing);
    assert_eq!(code, i32::from(exit::NO_INPUT));
    assert_eq!(stdout, "");
    assert!(stderr.contains(&missing.display().to_string()), "{stderr}");
    assert!(stderr.contains("No such file"), "{stderr}");
}

#[test]
fn a_secret_file_is_read_relative_to_the_config_without_its_line_break() {
    let temp = tempfile::tempdir().unwrap();
    std::fs::create_dir(temp.path().join("secrets")).unwrap();
    write_file(
        &temp.path().join("secrets"),
        "token",
        "access-token-0123456789\r\n",
        0o600,
    );
    let path = write_config(
        temp.path(),
        "[smaregi]\ncontract-id = \"sb_abc123\"\nterminal-id = \"9\"\naccess-token = { file = \"secrets/token\" }\n",
    );
    let loaded = config::load(&path).unwrap();
    let smaregi = loaded.config.smaregi.unwrap();
    assert_eq!(smaregi.access_token.expose(), "access-token-0123456789");
    assert_eq!(smaregi.contract_id, "sb_abc123");
    assert_eq!(
        loaded.config.storage.state_directory,
        temp.path().join("state")
    );
}

#[test]
fn a_missing_secret_file_is_an_error_at_the_secret() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_config(temp.path(), "");
    std::fs::remove_file(temp.path().join("intake-secret")).unwrap();
    let errors = errors_of(config::load(&path));
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with(&format!("{}:5:10: cannot read secret file", path.display())),
        "{errors:?}"
    );
}

#[test]
fn a_systemd_credential_is_read_from_credentials_directory() {
    let temp = tempfile::tempdir().unwrap();
    let credentials = temp.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    write_file(
        &credentials,
        "intake-secret",
        "from-systemd-credential-0123",
        0o400,
    );
    let text = "[intake]\nsecret = { credential = \"intake-secret\" }\n";
    let path = write_file(temp.path(), "config.toml", text, 0o640);

    let env = SecretEnvironment {
        config_directory: temp.path().to_path_buf(),
        credentials_directory: Some(credentials.clone()),
    };
    let loaded = config::load_with(&path, &env).unwrap();
    assert_eq!(
        loaded.config.intake.secret.expose(),
        "from-systemd-credential-0123"
    );

    // And from the real environment variable, through the binary.
    let args = ["check-config", "--config", path.to_str().unwrap()];
    let (code, stdout, _) = run_relay(&args, &[("CREDENTIALS_DIRECTORY", &credentials)]);
    assert_eq!((code, stdout.as_str()), (0, "ok\n"));
    let (code, _, stderr) = run_relay(&args, &[]);
    assert_eq!(code, i32::from(exit::CONFIG));
    assert!(stderr.contains("$CREDENTIALS_DIRECTORY"), "{stderr}");
}

#[test]
fn secrets_readable_by_everyone_are_warned_about() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_config(temp.path(), "");
    write_file(temp.path(), "intake-secret", INTAKE_SECRET, 0o644);
    let loaded = config::load(&path).unwrap();
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert_eq!(loaded.warnings[0].severity, Severity::Warning);
    assert!(loaded.warnings[0]
        .message
        .contains("readable by every user"));

    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(
        (code, stdout.as_str()),
        (0, "ok\n"),
        "warnings do not fail the check"
    );
    assert!(stderr.contains(": warning: secret file"), "{stderr}");

    write_file(temp.path(), "intake-secret", INTAKE_SECRET, 0o640);
    assert!(config::load(&path).unwrap().warnings.is_empty());
}

#[test]
fn a_world_readable_config_with_inline_secrets_is_warned_about() {
    let temp = tempfile::tempdir().unwrap();
    let text = format!("[intake]\nsecret = \"{INTAKE_SECRET}\"\n");
    let path = write_file(temp.path(), "config.toml", &text, 0o644);
    let warnings = config::load(&path).unwrap().warnings;
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].message.contains("this file holds secrets"));

    write_file(temp.path(), "config.toml", &text, 0o640);
    assert!(config::load(&path).unwrap().warnings.is_empty());
}

#[test]
fn secrets_never_appear_in_debug_output_or_errors() {
    let temp = tempfile::tempdir().unwrap();
    let path = write_config(temp.path(), "");
    let loaded = config::load(&path).unwrap();
    assert!(!format!("{loaded:?}").contains(INTAKE_SECRET));

    let text = "[intake]\nsecret = \"tooshort\"\n";
    let path = write_file(temp.path(), "config.toml", text, 0o600);
    let errors = errors_of(config::load(&path));
    assert!(!errors.iter().any(|e| e.contains("tooshort")), "{errors:?}");
}
