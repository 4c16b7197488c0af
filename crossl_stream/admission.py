"""Which subjects get windows: an allowlist, an id pattern, and a limit from config.

An MQTT wildcard topic lets anyone who can publish name a new subject; each one admitted
costs a windower, a device-clock fit and kept encoder features. Admission decides once per
subject and keeps deciding the same way: the admitted stay admitted (never evicted by
newcomers) until the pipeline retires them; the refused are counted, by reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


class Admission:
    """Owns the set of admitted subjects and the counts of refusals.

    ``allow``: the only subject ids admitted (None: any); ``pattern``: a regex an id must
    match whole; ``max_subjects``: how many may be admitted at once. The empty subject
    (a reader that serves one person) is always admitted.

    >>> a = Admission(pattern=r"s\\d{2}", max_subjects=2)
    >>> [a.admit(s) for s in ("s01", "junk", "s02", "s03", "s01")]
    [True, False, True, False, True]
    >>> a.refused
    {'pattern': 1, 'full': 1}
    """

    def __init__(
        self,
        allow: Iterable[str] | None = None,
        pattern: str | None = None,
        max_subjects: int = 256,
    ) -> None:
        self.allow = frozenset(allow) if allow is not None else None
        self.pattern = re.compile(pattern) if pattern else None
        self.max_subjects = max_subjects
        self.admitted: set[str] = set()
        self.refused: dict[str, int] = {}

    def admit(self, subject: str) -> bool:
        """Whether ``subject``'s data may be kept; a refusal is counted."""
        if subject in self.admitted or subject == "":
            return True
        if self.allow is not None and subject not in self.allow:
            return self._refuse("not allowed")
        if self.pattern is not None and not self.pattern.fullmatch(subject):
            return self._refuse("pattern")
        if len(self.admitted) >= self.max_subjects:
            return self._refuse("full")
        self.admitted.add(subject)
        return True

    def release(self, subject: str) -> None:
        """``subject`` left (every sensor lost): its place is free again."""
        self.admitted.discard(subject)

    def _refuse(self, reason: str) -> bool:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        return False
