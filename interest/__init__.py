"""interest-stream: the `interest` command line joins streams/, encoder/ and export/."""
