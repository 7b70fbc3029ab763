"""Reports: matplotlib figures embedded in one self-contained HTML file."""
