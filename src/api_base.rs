//! The one grammar of a model's `apiBase`, shared by the CRD and the gateway so that what
//! `kubectl apply` accepts is exactly what the gateway starts with.
//!
//! The gateway parses `apiBase` with the WHATWG URL parser (`url::Url`), which repairs much
//! (backslashes, missing slashes, spaces, octal IPv4, punycode) and refuses some hosts only
//! deep in its IPv4 and IDNA rules; CEL in the API server parses URLs with Go's `net/url`,
//! which disagrees with it on such inputs. Neither parser is the rule, then: a regular
//! expression is ([`PATTERN`]), written so that every string it matches is one `url::Url`
//! parses as the same URL, and evaluated by both sides (RE2 in the API server, the `regex`
//! crate here: the same syntax for what it uses). The CRD's CEL rules ([`cel_rules`]) say
//! first what is wrong in the common cases (scheme, fragment, credentials, port), then the
//! grammar. A table test (here) and an API-server test (tests/integration) keep the two
//! sides in agreement.

use std::sync::LazyLock;

/// A DNS label (letters, digits, '-', '_'; neither first nor last a '-').
const LABEL: &str = r"[A-Za-z0-9_]([-A-Za-z0-9_]*[A-Za-z0-9_])?";
/// The last label starts with a letter: the URL parser reads a host whose last label is a number
/// as an IPv4 address (and refuses `a.1`).
const LAST_LABEL: &str = r"[A-Za-z]([-A-Za-z0-9_]*[A-Za-z0-9_])?";
/// A label starting with `xn--`: the URL parser decodes it as punycode and refuses bad ones.
const IDN: &str = r"^https?://([^/?#]*[.])?[Xx][Nn]--";
const OCTET: &str = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
const H16: &str = r"[0-9A-Fa-f]{1,4}";
/// 1 to 65535, without leading zeros.
const PORT: &str =
    r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])";
/// Path and query characters: RFC 3986's unreserved and sub-delims but `'`, plus ':' '@' '/', and
/// `%` only as an escape.
const PCHAR: &str = r"([-A-Za-z0-9._~!$&()*+,;=:@/]|%[0-9A-Fa-f]{2})";

/// The whole grammar: `http(s)://HOST[:PORT][/PATH][?QUERY]`.
pub static PATTERN: LazyLock<String> = LazyLock::new(|| {
    let name = format!(r"({LABEL}\.)*{LAST_LABEL}");
    let ipv4 = format!(r"({OCTET}\.){{3}}{OCTET}");
    let ipv6 = [
        format!(r"({H16}:){{7}}{H16}"),
        format!(r"({H16}:){{1,7}}:"),
        format!(r"({H16}:){{1,6}}:{H16}"),
        format!(r"({H16}:){{1,5}}(:{H16}){{1,2}}"),
        format!(r"({H16}:){{1,4}}(:{H16}){{1,3}}"),
        format!(r"({H16}:){{1,3}}(:{H16}){{1,4}}"),
        format!(r"({H16}:){{1,2}}(:{H16}){{1,5}}"),
        format!(r"{H16}:(:{H16}){{1,6}}"),
        format!(r":((:{H16}){{1,7}}|:)"),
    ]
    .join("|");
    format!(r"^https?://({ipv4}|{name}|\[({ipv6})\])(:{PORT})?(/{PCHAR}*)?(\?({PCHAR}|\?)*)?$")
});

/// A port above 65535 (or with a leading zero, or six digits or more) after the host.
const BAD_PORT: &str = r"^https?://([^/?#@\[]*|\[[^/?#@]*\]):([0-9]{6,}|0[0-9]*|6553[6-9]|655[4-9][0-9]|65[6-9][0-9]{2}|6[6-9][0-9]{3}|[7-9][0-9]{4})([/?]|$)";
const SCHEME: &str = r"^https?://";
const USERINFO: &str = r"^[^/?#]*//[^/?#]*@";

static FULL: LazyLock<regex::Regex> = LazyLock::new(|| compile(&PATTERN));
static BAD_PORT_RE: LazyLock<regex::Regex> = LazyLock::new(|| compile(BAD_PORT));
static IDN_RE: LazyLock<regex::Regex> = LazyLock::new(|| compile(IDN));
static SCHEME_RE: LazyLock<regex::Regex> = LazyLock::new(|| compile(SCHEME));
static USERINFO_RE: LazyLock<regex::Regex> = LazyLock::new(|| compile(USERINFO));

fn compile(pattern: &str) -> regex::Regex {
    // The patterns are constants, compiled by the tests below.
    #[allow(clippy::expect_used)]
    regex::Regex::new(pattern).expect("apiBase pattern compiles")
}

const MSG_SCHEME: &str = "apiBase must start with http:// or https:// (in lower case)";
const MSG_FRAGMENT: &str = "apiBase must not have a #fragment";
const MSG_USERINFO: &str = "apiBase must not carry a user or password (user:password@host): put the key in apiKeySecretRef";
const MSG_PORT: &str = "apiBase's port must be a number from 1 to 65535, without leading zeros";
const MSG_GRAMMAR: &str = "apiBase must be http(s)://HOST[:PORT][/PATH][?QUERY]: HOST a DNS name (letters, digits, '-', '_'; the last label starting with a letter, not xn--), an IPv4 address or an [IPv6] address; no spaces, quotes, '\\' or '%' other than %XX escapes";

/// What is wrong with `api_base`, as the CRD's rules say it (None: it is valid). The first
/// failing rule's message, in [`cel_rules`]' order.
pub fn problem(api_base: &str) -> Option<&'static str> {
    if !SCHEME_RE.is_match(api_base) {
        Some(MSG_SCHEME)
    } else if api_base.contains('#') {
        Some(MSG_FRAGMENT)
    } else if USERINFO_RE.is_match(api_base) {
        Some(MSG_USERINFO)
    } else if BAD_PORT_RE.is_match(api_base) {
        Some(MSG_PORT)
    } else if IDN_RE.is_match(api_base) || !FULL.is_match(api_base) {
        Some(MSG_GRAMMAR)
    } else {
        None
    }
}

/// The CRD's rules on `apiBase`, as (CEL expression, message): each assumes the ones before it
/// hold (it is true otherwise), so one message says what is wrong. Raw CEL strings (`r'...'`)
/// carry the patterns as written; none contains a `'`.
pub fn cel_rules() -> Vec<(String, &'static str)> {
    let m = |p: &str| format!("self.matches(r'{p}')");
    let earlier = format!("!{} || self.contains('#') || {}", m(SCHEME), m(USERINFO));
    vec![
        (m(SCHEME), MSG_SCHEME),
        ("!self.contains('#')".to_string(), MSG_FRAGMENT),
        (format!("!{} || !{}", m(SCHEME), m(USERINFO)), MSG_USERINFO),
        (format!("{earlier} || !{}", m(BAD_PORT)), MSG_PORT),
        (
            format!(
                "{earlier} || {} || (!{} && {})",
                m(BAD_PORT),
                m(IDN),
                m(&PATTERN)
            ),
            MSG_GRAMMAR,
        ),
    ]
}

/// Examples of the grammar, (apiBase, valid?): the table the unit tests here and the API-server
/// test (tests/integration/e2e_validation.rs) both check, so the two sides are seen to agree.
pub const CASES: &[(&str, bool)] = &[
    ("https://api.openai.com/v1", true),
    ("http://vllm.models.svc:8000/v1", true),
    ("http://vllm:8000", true),
    ("http://localhost", true),
    ("https://res.openai.azure.com/openai/", true),
    ("http://10.0.0.5:8080/v1", true),
    ("http://255.255.255.255:65535", true),
    ("http://[::1]:8080/v1", true),
    ("http://[2001:db8::a:1]/v1", true),
    ("http://[fe80::]", true),
    ("https://host/v1?api-version=2024-10-21&x=%2F", true),
    ("https://my_host.example.com/a/b/", true),
    ("http://x:1", true),
    ("http://9host.example.com", true),
    ("http://xylo.example.com", true),
    ("http://a.xn", true),
    ("http://ab--cd.example", true),
    ("http://_a_.b_", true),
    (
        "http://aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example/v1",
        true,
    ),
    ("http://host:65536", false),
    ("http://host:99999999", false),
    ("http://host:0", false),
    ("http://host:080", false),
    ("http://host:", false),
    ("https://host/v1#frag", false),
    ("https://user:pw@host/v1", false),
    ("https://user@host", false),
    ("ftp://host/v1", false),
    ("HTTP://host", false),
    ("https:host", false),
    ("https:///host", false),
    ("https://", false),
    ("not a url", false),
    ("https://ho st/v1", false),
    ("https://host/v 1", false),
    (" https://host", false),
    ("https://host\\v1", false),
    ("https://host/%zz", false),
    ("https://host/it's", false),
    ("http://1.2.3.256", false),
    ("http://01.2.3.4", false),
    ("http://1.2.3", false),
    ("http://999", false),
    ("http://a.123", false),
    ("http://host.0x1f", false),
    ("http://xn--zz.com", false),
    ("http://xn--bcher-kva.example", false),
    ("http://a.b.xn--p1ai", false),
    ("http://-host", false),
    ("http://host-", false),
    ("http://a..b", false),
    ("http://host./v1", false),
    ("http://[::1", false),
    ("http://[1:2:3:4:5:6:7:8:9]", false),
    ("http://[::ffff:1.2.3.4]", false),
    ("http://[fe80::1%25eth0]", false),
    ("http://héllo.example", false),
    ("http://a.XN--p1ai/v1", false),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_what_the_grammar_says() {
        for (case, valid) in CASES {
            assert_eq!(
                problem(case).is_none(),
                *valid,
                "{case:?}: {:?}",
                problem(case)
            );
        }
    }

    #[test]
    fn whatever_the_grammar_accepts_the_url_parser_reads_as_written() {
        for (case, valid) in CASES.iter().filter(|(_, v)| *v) {
            let url = url::Url::parse(case).unwrap_or_else(|e| panic!("{case:?}: {e}"));
            assert!(
                *valid && matches!(url.scheme(), "http" | "https"),
                "{case:?}"
            );
            assert!(
                url.fragment().is_none() && url.username().is_empty(),
                "{case:?}"
            );
            assert!(!url.cannot_be_a_base(), "{case:?}");
            // Same host as written (up to case), so no repair took place.
            let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
            assert!(
                case.to_ascii_lowercase().contains(&host),
                "{case:?} -> {host}"
            );
        }
    }

    #[test]
    fn each_common_mistake_has_its_own_message() {
        assert_eq!(problem("ftp://h"), Some(MSG_SCHEME));
        assert_eq!(problem("http://h/#x"), Some(MSG_FRAGMENT));
        assert_eq!(problem("http://u:p@h"), Some(MSG_USERINFO));
        assert_eq!(problem("http://h:70000/v1"), Some(MSG_PORT));
        assert_eq!(problem("http://[::1]:65536"), Some(MSG_PORT));
        assert_eq!(problem("http://h h"), Some(MSG_GRAMMAR));
    }

    #[test]
    fn the_cel_rules_hold_no_quote_that_would_end_a_raw_string() {
        for (rule, _) in cel_rules() {
            let inner: Vec<&str> = rule.split("r'").skip(1).collect();
            for part in inner {
                let pattern = part.split('\'').next().unwrap_or_default();
                assert!(regex::Regex::new(pattern).is_ok(), "{pattern}");
            }
        }
    }
}
