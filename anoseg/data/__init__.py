"""Datasets in MVTec AD layout, the built-in demo dataset and synthetic anomalies."""
