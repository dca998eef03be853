"""The pipeline's stage list and its report, assembled from the upstream and downstream parts."""

from pathlib import Path
from typing import Dict, List, Mapping

from .report import write_report
from .runner import Context, Stage
from .downstream import downstream_sections, downstream_stages
from .upstream import upstream_stages


def build_stages(preset: Mapping) -> List[Stage]:
    return upstream_stages(preset) + downstream_stages(preset)


def finish(ctx: Context, preset_name: str, records: Dict[str, Dict]) -> Path:
    return write_report(ctx.out, preset_name, ctx.preset, records, downstream_sections(records))
