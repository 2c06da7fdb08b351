"""Reports: tables, results files and plots, built from what runs wrote."""
