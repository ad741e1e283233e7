"""The status page's site rows as markup (SPEC §12), made in Python rather than in the template.

A 1,000-site page has 1,000 rows of about twenty variable parts each; through Jinja2 they cost
a third of the page (an attribute lookup, an escape and a generator step per part). Here each
row is one f-string. Everything that comes from job files or agents (company, city,
neighborhood, database names) goes through `markupsafe.escape`, as autoescape would; the rest
(ids, verdict names, CSS classes, numbers) is ours. The pause/ack flags, rare and wordy, stay
in the template's `levers` macro, which the caller hands in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from urllib.parse import quote

from markupsafe import Markup, escape

from backupwatch.grid import Row
from backupwatch.store import JobView

Levers = Callable[[Sequence[JobView]], str]


def site_url(company: str, city: str, neighborhood: str) -> str:
    return "/site/" + "/".join(quote(part, safe="") for part in (company, city, neighborhood))


def site_row(row: Row, levers: Levers) -> Markup:
    """One site's `<tr>` on the index page, byte for byte what the template made."""
    key = row.key
    flags = f" {levers(row.jobs)}" if row.paused or row.acked else ""
    dbs = "".join(
        f'<a class="db" href="/job/{j.id}" title="{escape(j.database_name)}: '
        f'{j.current_status.value}">{escape(j.database_name)}</a>'
        for j in row.jobs
    )
    current = row.current
    if current is None:
        now = '<span class="cell v-unknown" title="never reported">◌</span>'
    else:
        now = (
            f'<span class="cell v-{current.css}" title="now: {current.label}">'
            f"{current.symbol}</span>"
        )
    pct = f"{row.ok * 100 / row.cycles:.0f}%" if row.cycles else "—"
    return Markup(  # noqa: S704 - every part from job files or agents is escaped above
        f'<tr class="site-row{" problem" if row.problem else ""}" data-site="{escape(row.name)}">\n'
        f'<td class="site"><a href="{escape(site_url(*key))}">{escape(key[1])} / '
        f"{escape(key[2])}</a>{flags}</td>\n"
        f'<td class="dbs">{dbs}</td>\n'
        f'<td class="now">{now}</td>\n'
        f"{row.html}\n"
        f'<td class="pct">{pct}</td>\n'
        "</tr>"
    )
