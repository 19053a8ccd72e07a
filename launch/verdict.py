"""What a check answers: (verdict, detail). OK, WARN (it may still run), FAIL (it would not),
SKIP (does not apply)."""

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
Verdict = tuple[str, str]
