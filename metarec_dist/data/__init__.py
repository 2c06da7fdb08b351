"""Data: importers -> Parquet domain store -> splits; the synthetic generator."""
