"""The run's reports, one job per module: `sce` (what SCE decided per tensor and layer),
`results` (the results table, Markdown, JSON and plot), `effects` (the fusion and merge
effects over seeds); `figures` holds the plotting canvas they share.

Every file is written atomically (`fusion.artifacts.atomic`), so a reader never sees half
a report and an interrupted run leaves the previous one intact.
"""
