"""The pipeline's stage list and its report, assembled from the upstream and downstream parts."""

from pathlib import Path
from typing import Dict, List, Mapping

from .downstream import detection_evidence, downstream_sections, downstream_stages, segmentation_evidence
from .report import frozen_feature_evidence, verdict_lines, write_report
from .runner import Context, Stage
from .upstream import upstream_stages


def build_stages(preset: Mapping) -> List[Stage]:
    return upstream_stages(preset) + downstream_stages(preset)


def finish(ctx: Context, preset_name: str, records: Dict[str, Dict], settings_line: str = "") -> Path:
    detection, segmentation = detection_evidence(ctx.out, records), segmentation_evidence(ctx.out, records)
    verdict = verdict_lines(records, frozen_feature_evidence(ctx.out, records), detection, segmentation)
    sections = downstream_sections(ctx.out, records, detection, segmentation)
    return write_report(ctx.out, preset_name, ctx.preset, records, sections, verdict, settings_line)
