"""The run's other pages the inspector links to: the evaluation report and the labs page.

Both are single self-contained HTML files (figures inlined), so serving one file each is enough.
They are found from the serving bundle's run directory (``feedrank demo`` and ``run_pipeline``
write ``RUN/bundle/`` beside ``RUN/report.html``); the labs page is ``RUN/labs/index.html`` or,
as the README's ``feedrank lab all --out runs/labs`` writes it, ``RUN/../labs/index.html``. Each
is looked up at every request, so a report written after the server started is linked too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException

REPORT_FILE = "report.html"  # feedrank.evaluate.report's default output name
LABS_PAGE = "index.html"  # feedrank.labs.page's page name (serving must not import labs/)


@dataclass(frozen=True)
class RunPages:
    """Candidate paths of each page, by the name it is served under (``/run/<name>``)."""

    candidates: dict[str, tuple[Path, ...]]

    @classmethod
    def of_bundle(cls, bundle_path: str | Path) -> RunPages:
        run = Path(bundle_path).resolve().parent
        return cls({"report.html": (run / REPORT_FILE,),
                    "labs.html": (run / "labs" / LABS_PAGE, run.parent / "labs" / LABS_PAGE)})  # fmt: skip

    def find(self, name: str) -> Path | None:
        return next((p for p in self.candidates.get(name, ()) if p.is_file()), None)

    def available(self) -> dict[str, str | None]:
        """Page name -> its URL on this server, or None when the run has no such page (yet)."""
        return {name.removesuffix(".html"): f"/run/{name}" if self.find(name) else None for name in self.candidates}

    def file(self, name: str) -> Path:
        path = self.find(name)
        if path is None:
            known = ", ".join(self.candidates)
            raise HTTPException(404, detail=f"no {name} for this run (pages: {known}; looked beside the bundle)"
                                if name in self.candidates else f"no run page {name!r}; pages: {known}")  # fmt: skip
        return path
