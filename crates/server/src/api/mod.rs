//! The HTTP surface: `/healthz`, the operator API under `/v1`, the agent endpoints, and the
//! OpenAPI document generated from the handlers.

mod agents;
mod convert;
mod machines;
mod run_commands;
mod run_events;
mod runs;

use axum::Router;
use axum::routing::get;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetrun",
        description = "Run scripts on fleets of machines. Every call except /healthz needs \
                       `Authorization: Bearer <token>`; errors are \
                       `{\"error\":{\"code\",\"message\",\"field\"}}`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(agents::health))
        .routes(routes!(agents::enroll))
        .routes(routes!(agents::connect))
        .routes(routes!(machines::list_machines))
        .routes(routes!(machines::get_machine, machines::delete_machine))
        .routes(routes!(runs::create_run, runs::list_runs))
        .routes(routes!(runs::get_run))
        .routes(routes!(runs::cancel_run))
        .routes(routes!(run_events::run_events))
        .routes(routes!(runs::list_executions))
        .routes(routes!(runs::get_execution))
        .routes(routes!(runs::execution_output))
        .routes(routes!(
            run_commands::put_run_command,
            run_commands::patch_run_command,
            run_commands::get_run_command,
            run_commands::delete_run_command
        ))
        .routes(routes!(run_commands::list_run_commands))
}

/// The OpenAPI document of the API, as served at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    router().split_for_parts().1
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let (router, document) = router().split_for_parts();
    let document = std::sync::Arc::new(document);
    router
        .route(
            "/v1/openapi.json",
            get(move || {
                let document = document.clone();
                async move { axum::Json(document.as_ref().clone()) }
            }),
        )
        .with_state(state)
}
