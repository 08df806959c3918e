"""relay/delivery/health.py: reply classification, path cool-down and suspension, the
destination's circuit breaker, and the `[delivery] path_cooldown` keys. A fake clock: plain
numbers passed as `now`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.config import ConfigError, load_config
from relay.config.policies import OnReply
from relay.delivery.health import (
    BLOCK,
    BREAKER_THRESHOLD,
    CLOSED,
    HALF_OPEN,
    MESSAGE,
    NONE,
    OPEN,
    TRANSIENT,
    Breaker,
    HealthBook,
    PathHealth,
    ReplyClass,
    ReplyKind,
    all_blocked,
    classify,
)

# --- classify -------------------------------------------------------------------------------

GMAIL_RATE = ("421-4.7.28 [192.0.2.20] Our system has detected an unusual rate of\n"
              "421-4.7.28 unsolicited mail originating from your IP address. To protect our\n"
              "421 4.7.28 users from spam, mail sent from your IP address has been temporarily\n"
              "421 4.7.28 rate limited. - gsmtp")
YAHOO_TSS04 = ("421 4.7.0 [TSS04] Messages from 192.0.2.20 temporarily deferred due to "
               "unexpected volume or user complaints - 4.16.55.1; see "
               "https://postmaster.yahooinc.com/error-codes")
OUTLOOK_650 = ("451 4.7.650 The mail server [192.0.2.20] has been temporarily rate limited "
               "due to IP reputation.")

BLOCKS = [
    # the generic defaults
    "554 5.7.1 Service unavailable; Client host [192.0.2.20] blocked using zen.spamhaus.org",
    "550 5.7.1 Your IP 192.0.2.20 is blacklisted",
    "550 Rejected: 192.0.2.20 listed at bl.example.org",
    "554 Sorry, you are listed in Spamhaus PBL",
    "421 4.7.0 Error: too many connections from 192.0.2.20",
    "450 4.7.1 You are rate limited, slow down",
    "421 4.3.2 Service shutting down, try again later",
    # Gmail
    GMAIL_RATE,
    "550-5.7.1 [192.0.2.20] Our system has detected an unusual rate of unsolicited mail "
    "originating from your IP address.",
    "421-4.7.0 Try again later, closing connection.",
    # Outlook / Hotmail
    "550 5.7.511 Access denied, banned sending IP [192.0.2.20].",
    "550 5.7.606 Access denied, banned sending IP [192.0.2.20]. To request removal ...",
    OUTLOOK_650,
    "451 4.7.500 Server busy. Please try again later from [192.0.2.20].",
    "550 5.7.1 Unfortunately, messages from [192.0.2.20] weren't sent. Please contact your "
    "Internet service provider since part of their network is on our block list (S3150).",
    "550 5.7.1 Unfortunately, messages from [192.0.2.20] weren't sent (S3140).",
    # Yahoo
    YAHOO_TSS04,
    "421 [IPTS04] Messages from 192.0.2.20 temporarily deferred due to unexpected volume",
    "421 4.7.1 [TS03] All messages from 192.0.2.20 will be permanently deferred",
    # QQ
    "550 Mail content denied. http://service.exmail.qq.com/cgi-bin/help?no=1000726",
    "550 Connection frequency limited. http://service.mail.qq.com/cgi-bin/help",
    "550 Ip frequency limited",
    "550 Mail sent by this IP has been blocked",
    # NetEase (163 / 126)
    "554 HL:IPB 192.0.2.20",
    "421 HL:ICC 192.0.2.20",
    "554 MI:SPB smtp3,abc 1528450981",
    "451 RP:CEL 192.0.2.20",
    "450 DT:RBL 192.0.2.20",
    "554 IP in blacklist",
    # about the source: SPF (5.7.23) and reverse DNS (5.7.25), by code or by text
    "550 5.7.23 The message was rejected because of Sender Policy Framework violation",
    "550-5.7.25 [192.0.2.20] The IP address sending this message does not have a "
    "PTR record setup",
    "450 4.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.20]",
    "550 MI:SPF 192.0.2.20",
]

MESSAGES = [
    # RFC 7372: DKIM, DMARC; another source would be rejected the same way
    "550 5.7.20 No passing DKIM signature found",
    "550 5.7.21 No acceptable DKIM signature found",
    "550 5.7.22 No valid author-matched DKIM signature found",
    "550-5.7.26 Unauthenticated email from example.com is not accepted due to domain's "
    "DMARC policy. Please contact the administrator of example.com domain.",
    "421-4.7.26 This mail has been rate limited because it is unauthenticated.",
    "550 5.7.24 SPF validation error: the record of example.com is not valid",
    "550 5.7.515 Access denied, sending domain example.com does not meet the required "
    "authentication level.",
    # content, even where the text also names a block
    "550-5.7.1 [192.0.2.20] Gmail has detected that this message is likely unsolicited "
    "mail. To reduce the amount of spam sent to Gmail, this message has been blocked.",
    "554 5.7.1 Message content rejected",
    "554 5.7.0 Virus found in attachment, message blocked",
    "554 DT:SPM 163 smtp5,jtKowAAnI4Cg 1528450981, please see http://mail.163.com/help",
    "550 5.6.0 Lone CR or LF in headers",
    "552 5.3.4 Message size exceeds fixed maximum message size",
    "451 4.7.1 Greylisted, please try again later",
]

NONES = [
    # a passing condition of the server's own, not a block of this source
    "451 4.3.0 Queue file write error, try again later",
    "451 Please try again later",
    "550 5.1.1 <nobody@example.net>: Recipient address rejected: User unknown",
    "452 4.2.2 The email account that you tried to reach is over quota.",
    "450 4.2.1 The user you are trying to contact is receiving mail at a rate that prevents "
    "additional messages from being delivered.",
    "451 4.3.0 Temporary lookup failure",
    "554 5.5.1 Error: no valid recipients",
    "",
]


@pytest.mark.parametrize("reply", BLOCKS)
def test_default_block_patterns_take_the_path_out(reply: str) -> None:
    assert classify(reply) == BLOCK


@pytest.mark.parametrize("reply", MESSAGES)
def test_failures_about_the_message_leave_the_path_alone(reply: str) -> None:
    assert classify(reply) == MESSAGE


@pytest.mark.parametrize("reply", NONES)
def test_other_replies_are_the_recipients_business(reply: str) -> None:
    assert classify(reply) == NONE


@pytest.mark.parametrize("reply", ["421 4.3.2 Service shutting down",
                                   "421 mx.example.net closing connection"])
def test_a_421_without_a_named_block_is_a_transient_path_failure(reply: str) -> None:
    assert classify(reply) == TRANSIENT


def rule(pattern: str, duration: float) -> OnReply:
    return OnReply(re.compile(pattern, re.IGNORECASE), "suspend", duration)


def test_on_reply_rules_come_first_and_the_first_match_wins() -> None:
    rules = [rule("TSS04|rate limited", 7200.0), rule("4\\.7\\.", 60.0)]
    assert classify(YAHOO_TSS04, rules) == ReplyClass(ReplyKind.SUSPEND, 7200.0)
    assert classify(OUTLOOK_650, rules) == ReplyClass(ReplyKind.SUSPEND, 7200.0)
    # before the message exclusions too: the user's rule says what they want
    assert classify("550 5.7.26 DMARC policy", [rule("dmarc", 30.0)]).kind is ReplyKind.SUSPEND
    # a rule that does not match leaves the defaults
    assert classify(GMAIL_RATE, [rule("TSS04", 60.0)]) == BLOCK


def test_enhanced_code_inside_an_address_is_not_a_code() -> None:
    # "4.16.55.1" is no X.6.* content code: the Yahoo reply stays a block
    assert classify("421 [XYZ] deferred - 4.16.55.1; try again later") == BLOCK
    assert classify("550 rejected from 5.6.7.8 try again later") == BLOCK


# --- PathHealth -----------------------------------------------------------------------------


def test_cooldown_doubles_up_to_the_cap_and_success_resets_it() -> None:
    path = PathHealth(cooldown=10.0, cooldown_max=35.0)
    assert path.available(0.0) and path.rate_factor(0.0) == 1.0
    now, waits = 0.0, []
    for _ in range(4):
        path.failure(now, ReplyKind.BLOCK, "554 blocked using spamhaus")
        assert not path.available(now) and path.rate_factor(now) == 0.0
        waits.append(path.until(now) - now)
        now = path.until(now)
        assert path.available(now)
    assert waits == [10.0, 20.0, 35.0, 35.0]
    path.success(now)
    path.failure(now, ReplyKind.TRANSIENT, "connect refused")
    assert path.until(now) - now == 10.0


def test_failures_of_attempts_already_in_flight_do_not_double_again() -> None:
    path = PathHealth(cooldown=10.0, cooldown_max=1000.0)
    path.failure(0.0, ReplyKind.TRANSIENT, "timed out")
    for t in (1.0, 2.0, 3.0):  # three more connections that were open when it went out
        path.failure(t, ReplyKind.TRANSIENT, "timed out")
    assert path.until(3.0) == 10.0 and path.failures == 1


def test_after_a_cooldown_one_probe_connection_until_a_success() -> None:
    path = PathHealth(cooldown=10.0)
    assert path.connection_cap(0.0, 20, rated=True) == 20
    path.failure(0.0, ReplyKind.BLOCK, "blocked")
    assert path.connection_cap(5.0, 20, rated=True) == 0
    assert path.probing(10.0) and path.connection_cap(10.0, 20, rated=True) == 1
    path.success(11.0)
    assert not path.probing(11.0) and path.connection_cap(11.0, 20, rated=True) == 20


def test_message_and_none_replies_change_nothing() -> None:
    path = PathHealth()
    for cls in (MESSAGE, NONE):
        path.record(0.0, cls, "550 5.7.26 DMARC")
    assert path.available(0.0) and path.failures == 0 and path.reason == ""


def test_suspension_then_half_rate_ramp_then_full_speed() -> None:
    path = PathHealth(cooldown=10.0)
    path.record(100.0, classify(YAHOO_TSS04, [rule("TSS04", 50.0)]), YAHOO_TSS04)
    # suspended: no connection at all
    assert not path.available(120.0) and path.until(120.0) == 150.0
    assert path.rate_factor(120.0) == 0.0 and path.connection_cap(120.0, 10, rated=False) == 0
    # one more duration at half the destination's rate, or one connection without a rate
    assert path.available(150.0) and path.ramping(150.0)
    assert path.rate_factor(170.0) == 0.5
    assert path.connection_cap(170.0, 10, rated=False) == 1
    assert path.connection_cap(170.0, 10, rated=True) == 10
    path.success(170.0)  # a success does not cut the ramp short
    assert path.rate_factor(199.0) == 0.5
    # then full speed
    assert path.rate_factor(200.0) == 1.0 and not path.ramping(200.0)
    assert path.connection_cap(200.0, 10, rated=False) == 10
    assert "[TSS04]" in path.reason and path.kind is ReplyKind.SUSPEND


def test_a_later_match_extends_a_suspension_never_shortens_it() -> None:
    path = PathHealth()
    path.suspend(0.0, 100.0, "TSS04")
    path.suspend(10.0, 5.0, "TSS04 again")
    assert path.until(10.0) == 100.0
    path.suspend(90.0, 100.0, "TSS04 once more")
    assert path.until(90.0) == 190.0


def test_reason_is_one_short_line() -> None:
    path = PathHealth()
    path.failure(0.0, ReplyKind.BLOCK, GMAIL_RATE + " x" * 500)
    assert "\n" not in path.reason and len(path.reason) <= 300
    assert path.reason.startswith("421-4.7.28 [192.0.2.20] Our system")


# --- every source blocked -------------------------------------------------------------------


def test_all_blocked_names_the_block_and_the_first_path_back() -> None:
    book = HealthBook(cooldown=10.0, cooldown_max=100.0)
    a, b = book.path("example.net", "192.0.2.20"), book.path("example.net", "192.0.2.21")
    a.failure(0.0, ReplyKind.BLOCK, "554 5.7.1 blocked using zen.spamhaus.org")
    assert book.deferral("example.net", ["192.0.2.20", "192.0.2.21"], 1.0) is None
    b.suspend(0.0, 5.0, "421 4.7.0 [TSS04] deferred")
    found = book.deferral("example.net", ["192.0.2.20", "192.0.2.21"], 1.0)
    assert found is not None and found.until == 5.0
    assert found.reason == "all sources of example.net are blocked: 421 4.7.0 [TSS04] deferred"
    # the kernel's-choice path ("") is a path like any other; no paths: nothing to say
    assert all_blocked("example.net", [], 1.0) is None
    assert book.deferral("example.org", [""], 1.0) is None


# --- Breaker --------------------------------------------------------------------------------


def test_breaker_opens_after_failures_in_a_row_then_lets_one_probe_through() -> None:
    breaker = Breaker(cooldown=10.0, cooldown_max=25.0)
    for t in range(BREAKER_THRESHOLD - 1):
        breaker.failure(float(t))
    breaker.success(2.5)  # an answer in between: the count starts over
    for _ in range(BREAKER_THRESHOLD - 1):
        breaker.failure(3.0)
    assert breaker.state(3.0) == CLOSED and breaker.allow(3.0)
    breaker.failure(3.0)
    assert breaker.state(3.0) == OPEN and not breaker.allow(5.0)
    assert breaker.until(5.0) == 13.0
    # half-open: one probe, no second attempt while it is out
    assert breaker.state(13.0) == HALF_OPEN
    assert breaker.allow(13.0) and not breaker.allow(13.5)
    # the probe fails: open again, for twice as long
    breaker.failure(14.0)
    assert breaker.state(14.0) == OPEN and breaker.until(14.0) == 34.0
    assert breaker.allow(34.0)
    breaker.failure(35.0)
    assert breaker.until(35.0) == 60.0  # capped at cooldown_max
    # a probe that succeeds closes it
    assert breaker.allow(60.0)
    breaker.success(61.0)
    assert breaker.state(61.0) == CLOSED and breaker.allow(61.0) and breaker.allow(61.0)


def test_breaker_replaces_a_probe_whose_outcome_never_came() -> None:
    breaker = Breaker(cooldown=10.0, threshold=1)
    breaker.failure(0.0)
    assert breaker.allow(10.0)  # the probe's job was handed back, no outcome reported
    assert not breaker.allow(15.0) and breaker.until(15.0) == 20.0
    assert breaker.allow(20.0)


def test_late_failures_while_open_do_not_extend_it() -> None:
    breaker = Breaker(cooldown=10.0, threshold=1)
    breaker.failure(0.0)
    breaker.failure(5.0)  # an attempt that was in flight
    assert breaker.until(5.0) == 10.0


def test_configure_keeps_state_and_changes_timings() -> None:
    book = HealthBook(cooldown=10.0, cooldown_max=100.0)
    path = book.path("example.net", "")
    path.failure(0.0, ReplyKind.BLOCK, "blocked")
    book.configure(1.0, 2.0)
    assert book.path("example.net", "") is path and not path.available(5.0)
    path.success(10.0)
    path.failure(10.0, ReplyKind.BLOCK, "blocked")
    assert path.until(10.0) == 11.0
    assert book.breaker("example.net").cooldown == 1.0


def test_prune_forgets_only_what_has_nothing_to_remember() -> None:
    book = HealthBook(cooldown=10.0)
    book.path("a.example", "192.0.2.20")  # used, healthy
    book.path("b.example", "192.0.2.20").failure(0.0, ReplyKind.BLOCK, "blocked")
    book.path("c.example", "192.0.2.20").suspend(0.0, 5.0, "TSS04")
    book.breaker("a.example")
    book.breaker("b.example").failure(0.0)
    assert book.prune(1.0) == 2
    assert book.path("b.example", "192.0.2.20").failures == 1
    assert book.path("c.example", "192.0.2.20").ramping(6.0)
    assert book.breaker("b.example").failures == 1


def test_on_reply_rules_from_a_policy_file(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.toml").write_text(
        '[[destination]]\ndomain = "yahoo.example"\n'
        'on_reply = [ { match = "tss04|4\\\\.7\\\\.650", action = "suspend", duration = "2h" } ]\n')
    path = tmp_path / "relay.toml"
    path.write_text('[queue]\npath = "var"\n[policies]\npath = "policies"\n')
    policy = load_config(path).destination_for("yahoo.example")
    assert policy is not None
    assert classify(YAHOO_TSS04, policy.on_reply) == ReplyClass(ReplyKind.SUSPEND, 7200.0)
    assert classify(OUTLOOK_650, policy.on_reply).kind is ReplyKind.SUSPEND
    assert classify(GMAIL_RATE, policy.on_reply) == BLOCK


# --- [delivery] path_cooldown, path_cooldown_max --------------------------------------------


def test_path_cooldown_keys_parse_with_the_duration_grammar(tmp_path: Path) -> None:
    assert load_config(None).delivery.path_cooldown == 60.0
    assert load_config(None).delivery.path_cooldown_max == 3600.0
    path = tmp_path / "relay.toml"
    path.write_text('[queue]\npath = "var"\n'
                    '[delivery]\npath_cooldown = "30s"\npath_cooldown_max = "2h"\n')
    config = load_config(path)
    assert (config.delivery.path_cooldown, config.delivery.path_cooldown_max) == (30.0, 7200.0)
    # the engine's book takes them at start and at a reload, keeping what it learnt
    book = HealthBook.from_config(load_config(None))
    book.path("example.net", "").failure(0.0, ReplyKind.BLOCK, "blocked")
    book.apply(config)
    assert book.path("example.net", "").until(0.0) == 60.0
    assert (book.cooldown, book.breaker("example.net").cooldown_max) == (30.0, 7200.0)


@pytest.mark.parametrize(("keys", "problem"), [
    ('path_cooldown = "soon"', "delivery.path_cooldown: \"soon\" is not a duration"),
    ('path_cooldown = "0"', "delivery.path_cooldown: must be more than 0"),
    ('path_cooldown = "2h"\npath_cooldown_max = "1h"',
     "delivery.path_cooldown: must not exceed path_cooldown_max (3600s)"),
])
def test_bad_path_cooldown_names_file_and_key(tmp_path: Path, keys: str, problem: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f'[queue]\npath = "var"\n[delivery]\n{keys}\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(line.startswith(f"{path}: {problem}") for line in caught.value.problems), \
        caught.value.problems
