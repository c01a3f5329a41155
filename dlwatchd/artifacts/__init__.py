"""What jobs leave behind: model folders and their metadata, probability maps, manifests, reports."""
