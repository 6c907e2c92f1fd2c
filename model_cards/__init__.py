"""Model-card templates for delta repos (rendered by deltahub.hub)."""
