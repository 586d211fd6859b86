//! Megatron Bridge configs load unchanged: every field that
//! `../shared/spec/megatron-bridge-notes.md` §1.3 lists for the config groups mbridge covers
//! (MoE-, multimodal- and NVRx-only fields aside) is a key of mbridge's schema, so a config
//! naming it never fails as an unknown key. What mbridge then does with a value it cannot
//! honour is `config::inert`'s business (tested there).

use mbridge::config::schema;

/// Field names by section (`dataset.packed_sequence_specs` is the nested table).
const MEGATRON_BRIDGE_FIELDS: &[(&str, &str)] = &[
    (
        "train",
        "micro_batch_size global_batch_size rampup_batch_size step_batch_size_schedule \
         decrease_batch_size_if_needed empty_unused_memory_level \
         check_weight_hash_across_dp_replicas_interval gpu_sniff_test_interval \
         train_sync_interval train_iters train_samples exit_interval exit_duration_in_mins \
         exit_signal_handler exit_signal exit_signal_handler_for_dataloader \
         exit_signal_handler_for_training manual_gc manual_gc_interval manual_gc_eval \
         iterations_to_skip num_epochs check_optimizer_step_success skip_sync_grad_norm_across_mp \
         eval_iters eval_interval skip_train",
    ),
    (
        "validation",
        "eval_iters eval_interval start_eval_at_iter eval_global_batch_size eval_micro_batch_size \
         skip_train test_mode full_validation multiple_validation_sets validation_set_names",
    ),
    (
        "scheduler",
        "lr_decay_style lr_wsd_decay_style lr_decay_iters lr_decay_samples lr_wsd_decay_iters \
         lr_wsd_decay_samples lr_warmup_fraction lr_warmup_iters lr_warmup_samples lr_warmup_init \
         override_opt_param_scheduler use_checkpoint_opt_param_scheduler start_weight_decay \
         end_weight_decay weight_decay_incr_style no_weight_decay_cond_type max_steps",
    ),
    (
        "checkpoint",
        "save save_interval save_params_interval save_activations_interval save_wgrads_interval \
         save_dgrads_interval save_retain_interval most_recent_k save_optim save_rng load \
         load_optim load_main_params_from_ckpt load_rng non_persistent_save_interval \
         non_persistent_ckpt_type non_persistent_global_ckpt_dir non_persistent_local_ckpt_dir \
         non_persistent_local_ckpt_algo finetune pretrained_checkpoint ckpt_step \
         use_checkpoint_args use_mp_args_from_checkpoint_args \
         use_tokenizer_model_from_checkpoint_args exit_on_missing_checkpoint ckpt_format \
         auto_detect_ckpt_format ckpt_convert_format ckpt_convert_save fully_parallel_save \
         async_save async_ckpt_cpu_priority async_ckpt_io_priority async_ckpt_use_cpu_shm \
         fully_parallel_load ckpt_fully_parallel_load_exchange_algo \
         ckpt_assume_constant_structure ckpt_load_validate_sharding_integrity \
         dist_ckpt_strictness dist_ckpt_save_pre_mcore_014 dist_ckpt_optim_fully_reshardable \
         distrib_optim_fully_reshardable_mem_efficient save_tokenizer_assets replication \
         replication_jump replication_factor verify_integrity storage_writers_per_rank \
         use_persistent_ckpt_worker async_strategy async_write_results_mp_mode \
         strict_fsdp_dtensor_load custom_manager_class dist_ckpt_workers also_save_hf_checkpoint \
         hf_source_path hf_trust_remote_code hf_distributed_save hf_save_every_n_ranks",
    ),
    (
        "logger",
        "log_interval log_params_norm log_throughput log_throughput_to_tensorboard \
         throughput_window_size log_progress timing_log_level timing_log_option tensorboard_dir \
         tensorboard_log_interval tensorboard_queue_size log_timers_to_tensorboard \
         log_loss_scale_to_tensorboard log_validation_ppl_to_tensorboard \
         log_memory_to_tensorboard memory_keys log_memory_interval log_device_memory_used \
         log_l2_norm_grad_to_tensorboard log_num_zeros_in_grad log_max_attention_logit \
         log_runtime_to_tensorboard runtime_time_unit barrier_with_L1_time \
         log_world_size_to_tensorboard wandb_project wandb_exp_name wandb_save_dir wandb_entity \
         logging_level filter_warnings modules_to_filter set_level_for_all_loggers log_energy \
         save_config_filepath skip_train_metrics_log mlflow_experiment mlflow_run_name \
         mlflow_tracking_uri mlflow_tags mlflow_description mlflow_log_artifacts comet_project \
         comet_experiment_name comet_workspace comet_api_key comet_tags",
    ),
    (
        "dist",
        "distributed_backend distributed_timeout_minutes align_grad_reduce local_rank \
         lazy_mpu_init use_megatron_fsdp use_torch_fsdp2 nccl_communicator_config_path \
         use_tp_pp_dp_mapping use_gloo_process_groups use_sharp sharp_enabled_group \
         high_priority_stream_groups distributed_timeout_seconds_after_init disable_jit_fuser \
         external_gpu_device_mapping enable_megatron_core_experimental use_decentralized_pg \
         eval_context_parallel_size",
    ),
    ("rng", "seed te_rng_tracker inference_rng_tracker data_parallel_random_init"),
    (
        "profiling",
        "use_nsys_profiler profile_step_start profile_step_end use_pytorch_profiler \
         pytorch_profiler_collect_shapes pytorch_profiler_collect_callstack \
         pytorch_profiler_collect_chakra profile_ranks record_memory_history memory_snapshot_path \
         record_shapes nvtx_ranges",
    ),
    (
        "rerun_state_machine",
        "error_injection_rate error_injection_type rerun_mode check_for_nan_in_loss \
         check_for_spiky_loss spiky_loss_factor",
    ),
    (
        "ddp",
        "grad_reduce_in_fp32 overlap_grad_reduce overlap_param_gather align_param_gather \
         use_distributed_optimizer num_distributed_optimizer_instances check_for_nan_in_grad \
         check_for_large_grads bucket_size num_buckets pad_buckets_for_high_nccl_busbw \
         reduce_scatter_with_fp32_accumulation param_name_patterns_for_fp32_local_accumulation \
         average_in_collective fp8_param_gather fp4_param_gather \
         reuse_grad_buf_for_mxfp8_param_ag use_megatron_fsdp megatron_fsdp_version \
         data_parallel_sharding_strategy gradient_reduce_div_fusion outer_dp_sharding_strategy \
         nccl_ub delay_wgrad_compute",
    ),
    (
        "optimizer",
        "lr min_lr decoupled_lr decoupled_min_lr weight_decay apply_wd_to_qk_layernorm fp16 bf16 \
         params_dtype use_precision_aware_optimizer store_param_remainders main_grads_dtype \
         main_params_dtype exp_avg_dtype exp_avg_sq_dtype optimizer loss_scale initial_loss_scale \
         min_loss_scale loss_scale_window hysteresis adam_beta1 adam_beta2 adam_eps \
         decoupled_weight_decay sgd_momentum use_distributed_optimizer \
         use_layer_wise_distributed_optimizer overlap_param_gather \
         overlap_param_gather_with_optimizer_step optimizer_cpu_offload \
         optimizer_offload_fraction clip_grad grad_norm_skip_threshold log_num_zeros_in_grad \
         optimizer_cuda_graph",
    ),
    (
        "dataset",
        "seq_length data_path blend blend_per_split multiple_validation_sets full_validation \
         split random_seed num_dataset_builder_threads path_to_cache mmap_bin_files \
         mid_level_dataset_surplus allow_ambiguous_pad_tokens fast_cache_load \
         defer_npy_index_mmap reset_position_ids reset_attention_mask eod_mask_loss \
         create_attention_mask drop_last_partial_validation_sequence add_extra_token_to_sequence \
         data_parallel_size sequences_per_dataset context_parallel_size inter_document_masking \
         skip_getting_attention_mask_from_dataset per_dataset_sequences_path dataloader_type \
         num_workers data_sharding pin_memory drop_last persistent_workers trust_remote_code \
         dataloader_save dataloader_load dataset_root hf_dataset hf_validation_dataset \
         hf_test_dataset hf_output_root hf_validation_proportion hf_rewrite seed memmap_workers \
         max_train_samples preprocessing enable_offline_packing offline_packing_specs \
         dataset_kwargs do_validation do_test packed_sequence_specs",
    ),
    (
        "dataset.packed_sequence_specs",
        "packed_sequence_size max_single_sequence_length tokenizer_model_name \
         num_tokenizer_workers packed_train_data_path packed_val_data_path packed_metadata_path \
         pad_cu_seqlens pad_seq_to_mult",
    ),
    (
        "tokenizer",
        "vocab_size padded_vocab_size pad_vocab_size vocab_file merge_file vocab_extra_ids \
         tokenizer_type tokenizer_model metadata_path special_tokens tiktoken_pattern \
         tiktoken_num_special_tokens tokenizer_sentencepiece_legacy tokenizer_hf_no_use_fast \
         tokenizer_hf_no_include_special_tokens trust_remote_code null_tokenizer_eod_id \
         null_tokenizer_pad_id chat_template make_vocab_size_divisible_by \
         tensor_model_parallel_size rank use_tokenizer_vocab_size hf_tokenizer_kwargs \
         sp_tokenizer_kwargs chat_template_path tokenizer_prompt_format force_system_message",
    ),
    (
        "mixed_precision",
        "fp32 fp16 bf16 params_dtype pipeline_dtype autocast_dtype autocast_enabled \
         grad_reduce_in_fp32 fp8 fp8_recipe first_last_layers_bf16 fp8_margin \
         fp8_amax_history_len fp8_amax_compute_algo fp8_wgrad fp8_dot_product_attention \
         fp8_multi_head_attention fp8_param fp8_param_gather fp4 fp4_recipe fp4_param \
         fp4_param_gather loss_scale initial_loss_scale min_loss_scale loss_scale_window \
         hysteresis num_layers_at_start_in_bf16 num_layers_at_end_in_bf16 \
         reuse_grad_buf_for_mxfp8_param_ag",
    ),
    (
        "comm_overlap",
        "tp_comm_overlap tp_comm_overlap_cfg tp_comm_bootstrap_backend overlap_p2p_comm \
         batch_p2p_comm overlap_grad_reduce overlap_param_gather \
         overlap_param_gather_with_optimizer_step align_param_gather bucket_size \
         defer_embedding_wgrad_compute wgrad_deferral_limit delay_wgrad_compute \
         data_parallel_size",
    ),
    (
        "peft",
        "target_modules exclude_modules dim alpha dropout dropout_position \
         sequence_parallel_input_regather lora_A_init_method lora_B_init_method a2a_experimental \
         lora_dtype",
    ),
    (
        "model",
        "fp16_lm_cross_entropy logit_dtype parallel_output share_embeddings_and_output_weights \
         make_vocab_size_divisible_by position_embedding_type rotary_base rotary_percent \
         rope_scaling rope_scaling_factor rotary_scaling_factor seq_len_interpolation_factor \
         yarn_rotary_scaling_factor yarn_original_max_position_embeddings yarn_beta_fast \
         yarn_beta_slow yarn_mscale yarn_mscale_all_dim yarn_correction_range_round_to_int \
         seq_length attention_softmax_in_fp32 deallocate_pipeline_outputs \
         scatter_embedding_sequence_parallel tp_only_amax_red tp_comm_overlap_cfg \
         use_transformer_engine_full_layer_spec use_transformer_engine_op_fuser \
         dense_grouped_gemm transformer_layer_spec hf_model_id hf_model_revision vocab_size \
         should_pad_vocab qk_layernorm fp8 normalization mtp_enabled init_model_with_meta_device \
         use_te_rng_tracker virtual_pipeline_model_parallel_size \
         account_for_embedding_in_pipeline_split account_for_loss_in_pipeline_split \
         masked_softmax_fusion cross_entropy_loss_fusion gradient_accumulation_fusion \
         restore_modelopt_state use_arbitrary_attention_mask num_layers hidden_size \
         num_attention_heads num_query_groups ffn_hidden_size kv_channels hidden_dropout \
         attention_dropout fp32_residual_connection apply_residual_connection_post_layernorm \
         layernorm_epsilon layernorm_zero_centered_gamma add_bias_linear add_qkv_bias \
         gated_linear_unit activation_func rotary_interleaved window_size qk_l2_norm \
         attention_output_gate calculate_per_token_loss multi_latent_attention init_method_std \
         apply_query_key_layer_scaling bias_activation_fusion persist_layer_norm \
         bias_dropout_fusion apply_rope_fusion recompute_granularity recompute_method \
         recompute_num_layers recompute_modules mtp_num_layers mtp_loss_scaling_factor \
         transformer_impl cuda_graph_impl tensor_model_parallel_size pipeline_model_parallel_size \
         sequence_parallel context_parallel_size expert_model_parallel_size \
         expert_tensor_parallel_size fp16 bf16 params_dtype deterministic_mode cp_comm_type \
         hierarchical_context_parallel_sizes q_lora_rank kv_lora_rank qk_head_dim \
         qk_pos_emb_head_dim v_head_dim rope_type mamba_state_dim mamba_head_dim mamba_num_groups \
         mamba_num_heads hybrid_layer_pattern",
    ),
];

#[test]
fn every_megatron_bridge_field_is_a_known_key() {
    let mut missing = Vec::new();
    for (section, fields) in MEGATRON_BRIDGE_FIELDS {
        for field in fields.split_whitespace() {
            let mut path: Vec<&str> = section.split('.').collect();
            path.push(field);
            if schema::lookup(&path).is_none() {
                missing.push(path.join("."));
            }
        }
    }
    assert!(missing.is_empty(), "not in mbridge's schema: {missing:?}");
}

#[test]
fn the_top_level_sections_are_known() {
    for key in ["env_vars", "optimizer_config_override_provider", "tensor_inspect"] {
        assert!(schema::lookup(&[key]).is_some(), "{key}");
    }
}
